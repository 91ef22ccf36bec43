// An echo service written with xmpp.js (@xmpp/component): an XEP-0114
// component from another ecosystem, for jrouter's end-to-end tests.
//
//   COMPONENT_SECRET=secret node echo.mjs DOMAIN HOST PORT LOGFILE
//
// It uses xmpp.js as an application would (component(), on('stanza'),
// stanza.is(), iqCallee, iqCaller, xml()) and repairs nothing: whatever
// xmpp.js makes of what the router sends is what the test sees.  Each event
// is one line (backslash and newline escaped as \\ and \n), appended and
// flushed at once to LOGFILE (to stdout if LOGFILE is -):
//
//   stream from=echo.example.test version=- id=...   the router's stream header
//   nonza stream:features ns=http://etherx.jabber.org/streams mechanisms=DIGEST-MD5
//   nonza handshake ns=jabber:component:accept
//   online as echo.example.test
//   stanza message ns=jabber:component:accept body-ns=jabber:component:accept type=chat from=alice@example.test/home
//   received message from alice@example.test/home body=hello
//   sent echo to alice@example.test/home
//   answered disco#info from alice@example.test/home
//   error Unexpected server response
//   disconnected
//
// What it does:
// * a <message> with a body is answered with "echo: BODY";
// * "tell JID TEXT" also sends JID a message of its own: "SENDER says TEXT";
// * "ask-server" sends a disco#info IQ to the sender's domain (iqCaller) and
//   answers "server identity: CATEGORY/TYPE NAME";
// * a disco#info get is answered by iqCallee (identity gateway/echo, one feature).
// A dropped stream ends the process (no reconnect), as a test expects.

import { appendFileSync } from "node:fs";
import { component } from "@xmpp/component";
import xml from "@xmpp/xml";

const NS_DISCO_INFO = "http://jabber.org/protocol/disco#info";
const NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl";

const [domain, host, port, logFile] = process.argv.slice(2);
const password = process.env.COMPONENT_SECRET;
if (!domain || !host || !port || !logFile || password === undefined) {
  console.error("usage: COMPONENT_SECRET=... node echo.mjs DOMAIN HOST PORT LOGFILE");
  process.exit(2);
}

function log(text) {
  const line = text.replace(/\\/g, "\\\\").replace(/\n/g, "\\n"); // one event, one line
  if (logFile === "-") console.log(line);
  else appendFileSync(logFile, line + "\n");
}

// IPv6 literals need brackets in the service URI.
const service = `xmpp://${host.includes(":") ? `[${host}]` : host}:${port}`;
const xmpp = component({ service, domain, password });
xmpp.reconnect.stop(); // one connection: the test sees a dropped stream as the end

xmpp.on("open", (header) => {
  const { from, version, id } = header.attrs;
  log(`stream from=${from ?? "-"} version=${version ?? "-"} id=${id ?? "-"}`);
});

xmpp.on("nonza", (el) => {
  const mechanisms = el.getChild("mechanisms", NS_SASL);
  const offered = mechanisms
    ? ` mechanisms=${mechanisms.getChildren("mechanism").map((m) => m.text()).join(",")}`
    : "";
  log(`nonza ${el.name} ns=${el.getNS()}${offered}`);
});

xmpp.on("online", (address) => log(`online as ${address}`));
xmpp.on("error", (err) => log(`error ${err.message}`));
xmpp.on("disconnect", () => {
  log("disconnected");
  process.exit(0);
});

xmpp.on("stanza", async (stanza) => {
  const body = stanza.getChild("body");
  log(`stanza ${stanza.name} ns=${stanza.getNS()} body-ns=${body ? body.getNS() : "-"}`
      + ` type=${stanza.attrs.type ?? "-"} from=${stanza.attrs.from}`);
  if (!stanza.is("message") || stanza.attrs.type === "error" || !body) return;
  try {
    await answer(stanza, body.text());
  } catch (err) {
    log(`error ${err.message}`);
  }
});

function message(from, to, type, text) {
  return xml("message", { from, to, type }, xml("body", {}, text));
}

async function answer(stanza, text) {
  const { from: sender, to: us } = stanza.attrs;
  const type = stanza.attrs.type === "normal" ? "normal" : "chat";
  log(`received message from ${sender} body=${text}`);

  const tell = /^tell (\S+) (.*)$/s.exec(text);
  if (tell) {
    await xmpp.send(message(us, tell[1], "chat", `${sender} says ${tell[2]}`));
    log(`sent notice to ${tell[1]}`);
  }
  if (text === "ask-server") {
    const server = sender.split("@").pop().split("/")[0];
    const info = await xmpp.iqCaller.get(xml("query", NS_DISCO_INFO), server);
    const id = info.getChild("identity");
    const found = id ? `${id.attrs.category}/${id.attrs.type} ${id.attrs.name ?? ""}` : "none";
    log(`server ${server} identity=${found}`);
    await xmpp.send(message(us, sender, type, `server identity: ${found}`));
  }
  await xmpp.send(message(us, sender, type, `echo: ${text}`));
  log(`sent echo to ${sender}`);
}

xmpp.iqCallee.get(NS_DISCO_INFO, "query", (ctx) => {
  log(`answered disco#info from ${ctx.stanza.attrs.from}`);
  return xml("query", NS_DISCO_INFO, [
    xml("identity", { category: "gateway", type: "echo", name: "xmpp.js echo" }),
    xml("feature", { var: NS_DISCO_INFO }),
  ]);
});

process.on("SIGTERM", async () => {
  log("stopping");
  try {
    await xmpp.stop();
  } finally {
    process.exit(0);
  }
});

xmpp.start().catch((err) => log(`start failed: ${err.message}`));
