"""Test certificates: a self-signed certificate and key in one PEM file, the
form jabberd2's <pemfile> takes (made with the openssl command)."""

import subprocess
from pathlib import Path


def make_pemfile(directory, name="router.pem", common_name="localhost"):
    directory = Path(directory)
    key, cert = directory / (name + ".key"), directory / (name + ".crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", f"/CN={common_name}"],
                   check=True, capture_output=True)
    pem = directory / name
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return pem
