/* The CNI plugin's launcher in the image's runtime: runs the flannel plugin's bytecode
 * in an embedded CPython that is only core-initialised.
 *
 * Why: `python3 -I -S` spends about half of its 9 ms start-up after the core is up
 * (importing `encodings` from disk, the io stack for sys.std*, the path-based importer,
 * signal handlers). The plugin needs none of that: it does its I/O through `posix` and
 * loads `_json` by path. Stopping after the core (`_init_main = 0`) halves the start.
 *
 * `/opt/cni/bin/flannel` is a script `#!<runtime>/bin/flannel-launcher`, so the kernel
 * runs this program as `flannel-launcher <script> [args...]`. The script's next lines
 * name the plugin's unchecked-hash .pyc and the runtime's lib-dynload directory:
 *
 *     #!/opt/cni/bin/.flannel-runtime-<id>/bin/flannel-launcher
 *     code /opt/cni/bin/.flannel-plugin-<id>/__pycache__/flannel_plugin.cpython-311.pyc
 *     dynload /opt/cni/bin/.flannel-runtime-<id>/lib/python3.11/lib-dynload
 *
 * The plugin's module body runs with `_FLANNEL_DYNLOAD` set to that directory, then its
 * run_and_exit() is called, which exits by itself. Whatever goes wrong here is reported
 * the CNI way: an error object on stdout and exit status 1. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#define SCRIPT_MAX 8192
#define CODE_MAX (16 * 1024 * 1024)
#define PYC_HEADER 16
/* importlib's magic for the bytecode of this Python (Lib/importlib/_bootstrap_external.py);
 * PyImport_GetMagicNumber() needs the path-based importer, which is never set up here. */
#if PY_MAJOR_VERSION == 3 && PY_MINOR_VERSION == 11
#define PYC_MAGIC 3495
#else
#error "PYC_MAGIC is known for Python 3.11 only; add this version's"
#endif

/* CPython 3.11 interns the strings of all ~25 deep-frozen modules at start-up
 * (_Py_Deepfreeze_Init). Hashing them writes to this binary's data pages, a copy-on-write
 * fault per page: 0.9-1.2 ms of a 4.7 ms start, measured with `perf stat`. The launcher
 * runs one of those modules, importlib._bootstrap (the core's import machinery), so only
 * its code objects are interned here; the plugin imports no other frozen module, and one
 * imported anyway would still work, with its names compared by value. Linked with
 * `-Wl,--wrap=_Py_Deepfreeze_Init`, so the interpreter's call lands here. */
extern PyObject *_Py_get_importlib__bootstrap_toplevel(void);
extern int _PyStaticCode_InternStrings(PyCodeObject *co);
int __wrap__Py_Deepfreeze_Init(void);

static int intern_code(PyCodeObject *co) {
    if (_PyStaticCode_InternStrings(co) < 0) return -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(co->co_consts); i++) {
        PyObject *c = PyTuple_GET_ITEM(co->co_consts, i);
        if (PyCode_Check(c) && intern_code((PyCodeObject *)c) < 0) return -1;
    }
    return 0;
}

int __wrap__Py_Deepfreeze_Init(void) {
    return intern_code((PyCodeObject *)_Py_get_importlib__bootstrap_toplevel());
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        buf += n;
        len -= (size_t)n;
    }
}

/* A CNI error object (code 999: internal); `detail` is shown as printable ASCII without
 * quotes or backslashes, so the JSON stays valid whatever it holds. */
static void fail(const char *what, const char *detail) {
    char shown[512] = "";
    if (detail) {
        size_t i = 0;
        for (; detail[i] && i < sizeof shown - 1; i++) {
            unsigned char c = (unsigned char)detail[i];
            shown[i] = (c < 0x20 || c > 0x7e || c == '"' || c == '\\') ? '?' : (char)c;
        }
        shown[i] = '\0';
    }
    char msg[1024];
    int n = snprintf(msg, sizeof msg,
                     "{\"cniVersion\":\"1.1.0\",\"code\":999,\"msg\":\"flannel plugin launcher: "
                     "%s%s%s\"}\n", what, detail ? ": " : "", shown);
    if (n > 0) write_all(1, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    _exit(1);
}

/* fail() with the pending Python exception as the detail. */
static void fail_python(const char *what) {
    PyObject *type = NULL, *exc = NULL, *tb = NULL;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    PyObject *text = exc ? PyObject_Str(exc) : NULL;
    const char *detail = text ? PyUnicode_AsUTF8(text) : NULL;
    fail(what, detail ? detail : "no Python exception");
}

static ssize_t read_file(const char *path, char *buf, size_t max) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, buf + got, max - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { close(fd); return -1; }
        if (n == 0) break;
        got += (size_t)n;
        if (got == max) break;
    }
    close(fd);
    return (ssize_t)got;
}

/* A copy of the value of the line "<key> <value>" in the script, or NULL. */
static char *script_value(const char *script, const char *key) {
    size_t klen = strlen(key);
    for (const char *line = script; *line; ) {
        size_t len = strcspn(line, "\n");
        if (len > klen && strncmp(line, key, klen) == 0 && line[klen] == ' ')
            return strndup(line + klen + 1, len - klen - 1);
        line += len;
        if (*line) line++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    static char script[SCRIPT_MAX + 1];
    if (argc < 2) fail("run it through the flannel script that names it", NULL);
    ssize_t n = read_file(argv[1], script, SCRIPT_MAX);
    if (n < 0) fail("cannot read the plugin script", strerror(errno));
    script[n] = '\0';
    char *code_path = script_value(script, "code");
    char *dynload = script_value(script, "dynload");
    if (!code_path || !dynload) fail("the plugin script has no code or dynload line", argv[1]);

    /* Isolated pre-configuration: no setlocale(), no locale coercion; UTF-8 for paths
     * and argv whatever the (often C) locale kubelet gives us. */
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.utf8_mode = 1;
    PyStatus st = Py_PreInitialize(&pre);
    if (PyStatus_Exception(st)) fail("cannot pre-initialise Python", st.err_msg);

    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.install_signal_handlers = 0;
    config.pathconfig_warnings = 0;
    config.module_search_paths_set = 1;  /* empty: nothing is imported from a path */
    config.optimization_level = 2;
    config._init_main = 0;  /* the core only: see the top of this file */
    st = PyConfig_SetBytesArgv(&config, argc - 1, argv + 1);
    if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) fail("cannot initialise Python", st.err_msg);

    /* The codec registry imports `encodings` the first time an error handler is looked
     * up (unmarshalling a string with a lone surrogate does). The plugin only uses UTF-8,
     * which never goes through the registry, so an empty module stands in for it. */
    PyObject *encodings = PyModule_New("encodings");
    if (!encodings || PyDict_SetItemString(PyImport_GetModuleDict(), "encodings", encodings) < 0)
        fail_python("cannot set up the codec registry");

    char *pyc = malloc(CODE_MAX);
    if (!pyc) fail("out of memory", NULL);
    n = read_file(code_path, pyc, CODE_MAX);
    if (n < 0) fail("cannot read the plugin's bytecode", strerror(errno));
    const unsigned char magic[4] = {PYC_MAGIC & 0xff, PYC_MAGIC >> 8, '\r', '\n'};
    if (n < PYC_HEADER || memcmp(pyc, magic, 4) != 0)
        fail("the plugin's bytecode is not for this Python; reinstall the plugin", code_path);
    PyObject *code = PyMarshal_ReadObjectFromString(pyc + PYC_HEADER, n - PYC_HEADER);
    free(pyc);
    if (!code) fail_python("the plugin's bytecode does not load");
    if (!PyCode_Check(code)) fail("the plugin's bytecode holds no code object", code_path);

    PyObject *globals = PyDict_New();
    PyObject *dir = PyUnicode_DecodeFSDefault(dynload);
    if (!globals || !dir || PyDict_SetItemString(globals, "__name__",
                                                 PyUnicode_FromString("flannel_plugin")) < 0
        || PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0
        || PyDict_SetItemString(globals, "_FLANNEL_DYNLOAD", dir) < 0)
        fail_python("cannot set up the plugin's module");
    PyObject *result = PyEval_EvalCode(code, globals, globals);
    PyObject *entry = result ? PyDict_GetItemString(globals, "run_and_exit") : NULL;
    if (entry) result = PyObject_CallNoArgs(entry);
    /* run_and_exit() does not return; getting here means the plugin itself failed. */
    fail_python(entry ? "the plugin returned" : "the plugin's module failed");
    return 1;
}
