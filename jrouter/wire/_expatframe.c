/* _expatframe: expat's callbacks in C, for xmlstream's reader.
 *
 * The framer of jrouter/wire/framing.py (ExpatFramer) binds expat through
 * pyexpat, which makes Python objects (a name, an attribute dict) and calls
 * a Python function for every element and namespace declaration of every
 * stanza. Routing reads only the top-level element and its first child, so
 * this framer makes Python objects for those alone and counts the depth of
 * everything else in C (docs/architecture.md, compiled). Its frames are
 * the same as ExpatFramer's; framing.py documents them and its tests run
 * on both.
 *
 * Memory safety: the only input is bytes handed to expat; every Python
 * object made is owned by one frame or one field below, and every failure
 * (a refused name, a Python exception, no memory) stops the parser, after
 * which no handler does anything.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <expat.h>
#include <string.h>
#include <strings.h>

/* Namespace names this framer already found in KNOWN_URIS: that set only
 * grows, so a name found once is taken from here without a Python string. */
#define SEEN_NAMES 8

typedef struct {
    PyObject_HEAD
    XML_Parser parser;
    int depth;              /* open elements, the stream's root counted */
    int max_depth;
    int failed;             /* an exception is set or was raised: handlers do nothing */
    PyObject *frames;       /* the list parse() appends to; only during parse() */
    PyObject *known;        /* lxml_side.KNOWN_URIS */
    PyObject *refused;      /* lxml_side.uri_refused */
    PyObject *error;        /* xmlstream.StreamError */
    PyObject *header_decls; /* the root's declarations: [(prefix, uri)] */
    /* The top-level element being read. */
    XML_Index top_start;
    PyObject *top_name, *top_attrs, *child_name, *child_attrs;
    XML_Index child_start, child_mark;   /* child_mark < 0: its end not seen */
    PyObject *seen[SEEN_NAMES];          /* bytes */
    int n_seen;
} Framer;

/* No GC support: a framer holds a set, a function, a class and the strings
 * and dicts of one element, none of which can refer back to it. */

static void
fail(Framer *self)
{
    if (!self->failed) {
        self->failed = 1;
        XML_StopParser(self->parser, XML_FALSE);
    }
}

static void
refuse(Framer *self, const char *condition, const char *text)
{
    PyObject *exc = PyObject_CallFunction(self->error, "ss", condition, text);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    fail(self);
}

static PyObject *
decode(const XML_Char *s)
{
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "strict");
}

/* {name: value} of expat's [name, value, ..., NULL], or NULL on failure. */
static PyObject *
attributes(const XML_Char **atts)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    for (; atts[0] != NULL; atts += 2) {
        PyObject *name = decode(atts[0]);
        PyObject *value = name ? decode(atts[1]) : NULL;
        int status = value ? PyDict_SetItem(dict, name, value) : -1;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (status < 0) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

static void
clear_element(Framer *self)
{
    Py_CLEAR(self->top_name);
    Py_CLEAR(self->top_attrs);
    Py_CLEAR(self->child_name);
    Py_CLEAR(self->child_attrs);
    self->child_mark = -1;
}

/* Append a new reference to the frames (and give it up). */
static int
emit(Framer *self, PyObject *frame)
{
    int status = frame ? PyList_Append(self->frames, frame) : -1;
    Py_XDECREF(frame);
    return status;
}

static void XMLCALL
on_start(void *data, const XML_Char *name, const XML_Char **atts)
{
    Framer *self = (Framer *)data;
    if (self->failed)
        return;
    int depth = self->depth++;
    if (depth == 1) {
        self->top_start = XML_GetCurrentByteIndex(self->parser);
        self->top_name = decode(name);
        self->top_attrs = self->top_name ? attributes(atts) : NULL;
        if (self->top_attrs == NULL)
            fail(self);
    }
    else if (depth == 2) {
        if (self->child_name == NULL) {
            self->child_start = XML_GetCurrentByteIndex(self->parser);
            self->child_name = decode(name);
            self->child_attrs = self->child_name ? attributes(atts) : NULL;
            if (self->child_attrs == NULL)
                fail(self);
        }
    }
    else if (depth == 0) {
        PyObject *header_name = decode(name);
        PyObject *attrs = header_name ? attributes(atts) : NULL;
        PyObject *frame = attrs ? Py_BuildValue("(OOOL)", header_name, attrs, self->header_decls,
                                                (long long)XML_GetCurrentByteIndex(self->parser))
                                : NULL;
        Py_XDECREF(header_name);
        Py_XDECREF(attrs);
        Py_CLEAR(self->header_decls);
        if (emit(self, frame) < 0)
            fail(self);
    }
    else if (depth > self->max_depth) {      /* depth is the new element's level */
        char text[64];
        PyOS_snprintf(text, sizeof text, "stanza nested too deeply (limit %d levels)", self->max_depth);
        refuse(self, "policy-violation", text);
    }
}

static void XMLCALL
on_end(void *data, const XML_Char *name)
{
    Framer *self = (Framer *)data;
    (void)name;
    if (self->failed)
        return;
    int depth = --self->depth;
    if (depth == 1) {
        /* expat's event is the end tag (or, for an empty element, nothing
         * after its start tag): the element ends where the event does. */
        XML_Index end = XML_GetCurrentByteIndex(self->parser) + XML_GetCurrentByteCount(self->parser);
        XML_Index start = self->top_start;
        PyObject *child_name = self->child_name ? self->child_name : Py_None;
        PyObject *child_attrs = self->child_attrs ? self->child_attrs : Py_None;
        long long child_start = self->child_name ? (long long)(self->child_start - start) : 0;
        long long child_mark = self->child_mark >= 0 ? (long long)(self->child_mark - start) : 0;
        PyObject *frame = Py_BuildValue("(LLOOOOLL)", (long long)start, (long long)end,
                                        self->top_name, self->top_attrs, child_name, child_attrs,
                                        child_start, child_mark);
        /* The frame has them now: a stanza's attributes are not kept here. */
        clear_element(self);
        if (emit(self, frame) < 0)
            fail(self);
    }
    else if (depth == 2) {
        if (self->child_mark < 0 && self->child_name != NULL)
            self->child_mark = XML_GetCurrentByteIndex(self->parser);
    }
    else if (depth == 0) {
        Py_INCREF(Py_None);
        if (emit(self, Py_None) < 0)
            fail(self);
    }
}

/* 0 if lxml will take this namespace name, else -1 with the error set. */
static int
vet_uri(Framer *self, const XML_Char *uri)
{
    if (uri == NULL)                        /* xmlns='': in KNOWN_URIS */
        return 0;
    size_t size = strlen(uri);
    for (int i = 0; i < self->n_seen; i++) {
        PyObject *seen = self->seen[i];
        if ((size_t)PyBytes_GET_SIZE(seen) == size && memcmp(PyBytes_AS_STRING(seen), uri, size) == 0)
            return 0;
    }
    PyObject *name = PyUnicode_DecodeUTF8(uri, (Py_ssize_t)size, "strict");
    if (name == NULL)
        return -1;
    int known = PySet_Contains(self->known, name);
    if (known == 0) {
        PyObject *answer = PyObject_CallOneArg(self->refused, name);
        int refused = answer ? PyObject_IsTrue(answer) : -1;
        Py_XDECREF(answer);
        if (refused == 0)                   /* taken: in the set now if short and ASCII */
            known = PySet_Contains(self->known, name);
        else {
            if (refused > 0)
                refuse(self, "xml-not-well-formed", "namespace name is not a URI");
            known = -1;
        }
    }
    Py_DECREF(name);
    if (known < 0)
        return -1;
    if (known && self->n_seen < SEEN_NAMES) {
        PyObject *seen = PyBytes_FromStringAndSize(uri, (Py_ssize_t)size);
        if (seen == NULL)
            return -1;
        self->seen[self->n_seen++] = seen;
    }
    return 0;
}

static void XMLCALL
on_namespace(void *data, const XML_Char *prefix, const XML_Char *uri)
{
    Framer *self = (Framer *)data;
    if (self->failed)
        return;
    if (vet_uri(self, uri) < 0) {
        fail(self);
        return;
    }
    if (self->depth == 0 && self->header_decls != NULL) {   /* the root's: the stream's context */
        PyObject *decl = Py_BuildValue("(zz)", prefix, uri);
        int status = decl ? PyList_Append(self->header_decls, decl) : -1;
        Py_XDECREF(decl);
        if (status < 0)
            fail(self);
    }
}

static void XMLCALL
on_xml_declaration(void *data, const XML_Char *version, const XML_Char *encoding, int standalone)
{
    Framer *self = (Framer *)data;
    (void)version;
    (void)standalone;
    if (self->failed)
        return;
    /* Read as UTF-8 whatever it says (xmlstream's docstring): saying another is refused. */
    if (encoding != NULL && strcasecmp(encoding, "UTF-8") != 0 && strcasecmp(encoding, "UTF8") != 0)
        refuse(self, "unsupported-encoding", "only UTF-8 is supported");
}

static void XMLCALL
on_doctype(void *data, const XML_Char *name, const XML_Char *sysid, const XML_Char *pubid,
           int has_internal_subset)
{
    Framer *self = (Framer *)data;
    (void)name, (void)sysid, (void)pubid, (void)has_internal_subset;
    if (!self->failed)
        refuse(self, "restricted-xml", "DTDs are not allowed");
}

static void XMLCALL
on_entity(void *data, const XML_Char *name, int is_parameter_entity, const XML_Char *value,
          int value_length, const XML_Char *base, const XML_Char *sysid, const XML_Char *pubid,
          const XML_Char *notation)
{
    Framer *self = (Framer *)data;
    (void)name, (void)is_parameter_entity, (void)value, (void)value_length;
    (void)base, (void)sysid, (void)pubid, (void)notation;
    if (!self->failed)
        refuse(self, "restricted-xml", "entity declarations are not allowed");
}

static const XML_Memory_Handling_Suite python_memory = {PyMem_Malloc, PyMem_Realloc, PyMem_Free};

/* -- the type ------------------------------------------------------------ */

static int
Framer_init(Framer *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_depth", "known", "refused", "error", NULL};
    int max_depth;
    PyObject *known, *refused, *error;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO!OO:Framer", keywords, &max_depth,
                                     &PySet_Type, &known, &refused, &error))
        return -1;
    if (self->parser != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Framer is made once");
        return -1;
    }
    /* UTF-8 whatever the document says; names expanded as "uri local".
     * Python's allocator, as pyexpat's: tracemalloc and the heap trimmer
     * see expat's tables (docs/architecture.md, memory). */
    self->parser = XML_ParserCreate_MM("UTF-8", &python_memory, " ");
    self->header_decls = PyList_New(0);
    if (self->parser == NULL || self->header_decls == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(known);
    Py_INCREF(refused);
    Py_INCREF(error);
    self->known = known;
    self->refused = refused;
    self->error = error;
    self->max_depth = max_depth;
    self->child_mark = -1;
    XML_SetUserData(self->parser, self);
    XML_SetParamEntityParsing(self->parser, XML_PARAM_ENTITY_PARSING_NEVER);
    XML_SetElementHandler(self->parser, on_start, on_end);
    XML_SetStartNamespaceDeclHandler(self->parser, on_namespace);
    XML_SetXmlDeclHandler(self->parser, on_xml_declaration);
    XML_SetStartDoctypeDeclHandler(self->parser, on_doctype);
    XML_SetEntityDeclHandler(self->parser, on_entity);
#if XML_MAJOR_VERSION > 2 || (XML_MAJOR_VERSION == 2 && XML_MINOR_VERSION >= 6)
    /* Every event as soon as its bytes are in: a stanza's end must not
     * wait for the next read (expat 2.6 defers large tokens otherwise). */
    XML_SetReparseDeferralEnabled(self->parser, XML_FALSE);
#endif
    return 0;
}

static void
Framer_dealloc(Framer *self)
{
    if (self->parser != NULL)
        XML_ParserFree(self->parser);
    clear_element(self);
    Py_CLEAR(self->header_decls);
    Py_CLEAR(self->known);
    Py_CLEAR(self->refused);
    Py_CLEAR(self->error);
    for (int i = 0; i < self->n_seen; i++)
        Py_CLEAR(self->seen[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(parse_doc,
"parse(data, buffer, base, frames)\n\n"
"Read ``data`` (bytes), appending to ``frames`` (a list) a frame for each\n"
"header, top-level element and stream end it completes. ``buffer`` and\n"
"``base`` are ExpatFramer's and not needed here. Raises ``error`` for\n"
"anything that ends the stream; the frames completed before it stay.");

static PyObject *
Framer_parse(Framer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "parse(data: bytes, buffer, base, frames: list)");
        return NULL;
    }
    if (self->parser == NULL) {
        PyErr_SetString(PyExc_TypeError, "Framer.__init__ was not called");
        return NULL;
    }
    if (self->failed) {
        PyErr_SetString(PyExc_ValueError, "this stream has already failed");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    self->frames = args[3];
    enum XML_Status status = XML_STATUS_OK;
    do {                                   /* expat takes an int length */
        int piece = size > (1 << 30) ? (1 << 30) : (int)size;
        status = XML_Parse(self->parser, data, piece, 0);
        data += piece;
        size -= piece;
    } while (status == XML_STATUS_OK && size > 0);
    self->frames = NULL;
    if (status == XML_STATUS_OK)
        Py_RETURN_NONE;
    if (!self->failed) {                    /* expat's own refusal */
        self->failed = 1;
        PyObject *exc = PyObject_CallFunction(self->error, "ss", "xml-not-well-formed",
                                              XML_ErrorString(XML_GetErrorCode(self->parser)));
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
    else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_SystemError, "_expatframe failed without an exception");
    return NULL;
}

static PyObject *
Framer_get_depth(Framer *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->depth);
}

static PyObject *
Framer_close(Framer *self, PyObject *unused)
{
    (void)unused;
    Py_RETURN_NONE;                        /* nothing to break: no cycle (see above) */
}

static PyMethodDef Framer_methods[] = {
    {"parse", (PyCFunction)(void (*)(void))Framer_parse, METH_FASTCALL, parse_doc},
    {"close", (PyCFunction)Framer_close, METH_NOARGS, "Nothing to let go of early (no cycle)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Framer_getset[] = {
    {"depth", (getter)Framer_get_depth, NULL, "Open elements, the stream's root counted.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "jrouter.wire._expatframe.Framer",
    .tp_basicsize = sizeof(Framer),
    .tp_dealloc = (destructor)Framer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Frames of one XML stream, read by expat with callbacks in C (framing.py).",
    .tp_methods = Framer_methods,
    .tp_getset = Framer_getset,
    .tp_init = (initproc)Framer_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "jrouter.wire._expatframe",
    .m_doc = "expat's callbacks in C for xmlstream's reader (framing.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__expatframe(void)
{
    if (PyType_Ready(&FramerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FramerType);
    if (PyModule_AddObject(m, "Framer", (PyObject *)&FramerType) < 0
        || PyModule_AddStringConstant(m, "EXPAT_VERSION", XML_ExpatVersion()) < 0) {
        Py_DECREF(&FramerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
