// Whether tensors still have the data pointers a cached update plan handed the kernel.
//
// Asked from Python, ``Tensor.data_ptr()`` costs about 0.1 us a tensor; a plan over 2,000
// small tensors checks 4,000 of them every step. Here one call checks them all, through the
// C function torch exports for the code torch.compile generates
// (``torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr``, ``void *(PyObject *)``).
// It is C++ and may throw, so it is called only inside try/catch, and only on objects whose
// type is exactly one of the types we are given (torch.Tensor, torch.nn.Parameter): anything
// else, or any exception, answers "not the same", which sends the caller back through its
// full checks in Python. No libtorch headers or linking: just the address, which the Python
// side trusts only after it has agreed with ``data_ptr()`` on test tensors.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>

typedef void *(*PointerReader)(PyObject *);

static bool same_pointers_or_throw(PointerReader read, PyObject *tensors, PyObject *types,
                                   const uint64_t *expected) {
    Py_ssize_t n = PyList_GET_SIZE(tensors), n_types = PyTuple_GET_SIZE(types);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *tensor = PyList_GET_ITEM(tensors, i);
        bool exact = false;
        for (Py_ssize_t k = 0; k < n_types; k++)
            exact = exact || (PyObject *)Py_TYPE(tensor) == PyTuple_GET_ITEM(types, k);
        if (!exact || (uint64_t)(uintptr_t)read(tensor) != expected[i])
            return false;
    }
    return true;
}

// same_pointers(reader_address, tensors: list, types: tuple, expected: buffer of uint64) -> bool
static PyObject *same_pointers(PyObject *, PyObject *args) {
    unsigned long long address;
    PyObject *tensors, *types;
    Py_buffer expected;
    if (!PyArg_ParseTuple(args, "KO!O!y*", &address, &PyList_Type, &tensors, &PyTuple_Type,
                          &types, &expected))
        return NULL;
    bool same = false;
    if (address != 0 && expected.len == PyList_GET_SIZE(tensors) * (Py_ssize_t)sizeof(uint64_t)) {
        try {
            same = same_pointers_or_throw((PointerReader)(uintptr_t)address, tensors, types,
                                          (const uint64_t *)expected.buf);
        } catch (...) {     // e.g. a tensor without storage: not the same, re-check in Python
            same = false;
        }
    }
    PyBuffer_Release(&expected);
    return PyBool_FromLong(same);
}

static PyMethodDef methods[] = {
    {"same_pointers", same_pointers, METH_VARARGS,
     "same_pointers(reader_address, tensors, types, expected) -> whether every tensor, of "
     "exactly one of types, has the expected data pointer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_data_pointers", NULL, -1, methods};

PyMODINIT_FUNC PyInit__data_pointers(void) { return PyModule_Create(&module); }
