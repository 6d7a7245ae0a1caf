"""The libhdf5 half of reading a Keras HDF5 file, run as a script in a child process.

libhdf5 (through h5py) is out of our control and known to crash, or to spin forever, on
malformed files: so it never runs in the reader's process. :mod:`.h5_sandbox` starts this
script with ``python -I``, sends it the file on stdin, and gives it a time limit. The script
opens the file, walks it as the reader needs (at most MAX_OBJECTS objects), and prints one
JSON object on stdout: the groups, the datasets (shape, dtype, layout, filters, stored size
and the file offset of their contiguous data) and the few attributes the reader uses. It
reads no dataset's values: the parent checks this answer (it does not trust it) and reads
the bytes itself, at the offsets given.

Usage: ``python -I h5_probe.py MODE MAX_OBJECTS MAX_CHARS SYS_PATH``. MODE ``file``: stdin is
the HDF5 file itself (a regular, seekable file); ``bytes``: stdin carries the file's bytes (a
``.keras`` archive's ``model.weights.h5``). MAX_CHARS: the most characters of object paths
in all (a path repeats its parents' names: deep nesting makes them quadratic). SYS_PATH:
the parent's ``sys.path`` as JSON, so that the child imports the h5py and numpy the parent
would have imported.

A standalone script: it imports json, sys, io, numpy and h5py, never tfcompat_ema (run with
``-I``, its own directory is not on ``sys.path``), torch or TensorFlow.

The answer: ``{"ok": false, "kind": "import" | "open" | "h5py" | "refused", "error": text}``
or ``{"ok": true, "root": ATTRS, "groups": {path: ATTRS}, "datasets": [DATASET...]}``, where
ATTRS maps each attribute asked for that is present to its text, null (not text), or
``{"error": text}`` (unreadable), and DATASET is ``{"path", "shape" (list, or null for an
empty dataspace), "dtype" (numpy's dtype.str, null for compound and array types),
"dtype_text", "exact" (the file's HDF5 type is the one h5py makes of that dtype, so its bytes
are numpy's), "layout", "external" (external files), "filters", "storage" (bytes stored),
"offset" (of the contiguous data, null where undefined), "attrs"}``.
"""
import io
import json
import sys

ROOT_KEYS = ("layer_names", "keras_version")
GROUP_KEYS = ("name", "keras_version")
DATASET_KEYS = ("dtype",)
TEXT_LIMIT = 1 << 16           # characters of one attribute's text (Keras' are names)
H5PY_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError)


class Refused(Exception):
    """The file is not one the reader walks (too many objects, an object of another kind)."""


def main(argv):
    mode, max_objects, max_chars, path = argv[1], int(argv[2]), int(argv[3]), \
        json.loads(argv[4])
    sys.path[:] = path
    try:
        import h5py
    except ImportError as error:
        return answer({"ok": False, "kind": "import", "error": str(error)})
    stdin = open(0, "rb", closefd=False)
    source = io.BytesIO(stdin.read()) if mode == "bytes" else stdin
    try:
        h5 = h5py.File(source, "r")
    except H5PY_ERRORS as error:
        return answer({"ok": False, "kind": "open", "error": str(error)})
    try:
        with h5:
            found = describe(h5, max_objects, max_chars, h5py)
    except Refused as error:
        found = {"ok": False, "kind": "refused", "error": str(error)}
    except H5PY_ERRORS as error:
        found = {"ok": False, "kind": "h5py", "error": f"{type(error).__name__}: {error}"}
    return answer(found)


def answer(found) -> int:
    out = sys.stdout.buffer
    out.write(json.dumps(found).encode("ascii"))      # (lone surrogates escaped, not lost)
    out.flush()
    return 0


def describe(h5, max_objects, max_chars, h5py):
    """The file's groups and datasets, walked as ``visititems`` walks them."""
    groups, datasets, count, chars = {}, {}, [0], [0]

    def visit(name, obj):
        count[0] += 1
        chars[0] += len(name)
        if count[0] > max_objects:
            raise Refused(f"more than {max_objects} HDF5 objects")
        if chars[0] > max_chars:
            raise Refused(f"more than {max_chars} characters of HDF5 paths")
        if isinstance(obj, h5py.Group):
            groups[name] = obj
        elif isinstance(obj, h5py.Dataset):
            datasets[name] = obj
        else:
            raise Refused(f"{name!r} is neither a group nor a dataset")
    h5.visititems(visit)
    # The whole walk first, then the attributes and datasets: a file whose structure is
    # broken fails with h5py's error for it (libhdf5 may crash reading a broken object).
    return {"ok": True, "root": attributes(h5, ROOT_KEYS),
            "groups": {name: attributes(obj, GROUP_KEYS) for name, obj in groups.items()},
            "datasets": [dataset(name, obj, h5py) for name, obj in datasets.items()]}


def dataset(name, obj, h5py):
    dtype = obj.dtype
    plist = obj.id.get_create_plist()
    layouts = {h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.COMPACT: "compact",
               h5py.h5d.CHUNKED: "chunked", getattr(h5py.h5d, "VIRTUAL", -1): "virtual"}
    plain = dtype.fields is None and dtype.subdtype is None
    return {
        "path": name,
        "shape": None if obj.shape is None else [int(n) for n in obj.shape],
        "dtype": dtype.str if plain else None,
        "dtype_text": str(dtype),
        # A float with a custom exponent bias, an integer with padding bits, a bitfield:
        # h5py gives them the nearest numpy dtype and libhdf5 converts the values on reading,
        # so their stored bytes are not that dtype's. Only types equal to h5py's own are read.
        "exact": bool(obj.id.get_type().equal(h5py.h5t.py_create(dtype, logical=True))),
        "layout": layouts.get(plist.get_layout(), str(plist.get_layout())),
        "external": int(plist.get_external_count()),
        "filters": int(plist.get_nfilters()),
        "storage": int(obj.id.get_storage_size()),
        "offset": obj.id.get_offset(),
        "attrs": attributes(obj, DATASET_KEYS),
    }


def attributes(obj, keys):
    """Each of ``keys`` present on ``obj``: its text, None (not text), or why unreadable
    (an error is the parent's to raise, where it uses the attribute)."""
    found = {}
    for key in keys:
        try:
            if key not in obj.attrs:
                continue
            value = obj.attrs.get(key)
        except H5PY_ERRORS as error:
            found[key] = {"error": f"{type(error).__name__}: {error}"}
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            found[key] = None
        elif len(value) > TEXT_LIMIT:
            found[key] = {"error": f"longer than {TEXT_LIMIT} characters"}
        else:
            found[key] = str(value)
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv))
