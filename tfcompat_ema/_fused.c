/* One-pass CPU kernels for TF's moving-average update, rounded op by op as TF rounds.
 *
 *   moving_average:  s = s - (s - v) * d                  (TF: assign_sub(v, (v - value) * decay))
 *   zero_debias:     b = b - (b - v) * d;  s = b / factor  (TF: _zero_debias, with factor computed
 *                                                           by the caller from local_step)
 *
 * Built with -ffp-contract=off: a fused multiply-add would round once where TF rounds twice.
 * The XLA variants reproduce TF's update as XLA compiles it on the CPU (jit_compile=True):
 *
 *   float32/float64:  s = fma(-(s - v), d, s)   one rounding for the multiply and the subtract
 *                                              (explicit C99 fma/fmaf, exact, under FTZ/DAZ)
 *   float16:          s = fma16(-r16(s - v), d, s)   the difference rounded to half, then
 *                     one fused multiply-add rounded once to half
 *   bfloat16:         as without XLA (XLA rounds every op to bfloat16)
 *
 * the debiased update with the same biased step, the division as without XLA.
 * TF runs its CPU kernels with denormals flushed to zero (FTZ and DAZ set on its threads), so
 * these kernels set the same two MXCSR bits on each of their threads and restore them after.
 * float16 and bfloat16 are computed in float32 and rounded to nearest-even after every op, as
 * Eigen does for TF.
 *
 * The tensors arrive as arrays of data pointers and element counts (all of one dtype, dense,
 * shadow and value laid out alike); the work is split evenly over the threads by element count.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FLUSH_BITS 0x8040u /* FTZ | DAZ */
#define FLUSH_BEGIN unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | FLUSH_BITS);
#define FLUSH_END _mm_setcsr(saved_csr_);
#else
#define FLUSH_BEGIN
#define FLUSH_END
#endif

enum { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

/* ---- float16 / bfloat16 <-> float32, round to nearest even ---- */
static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {               /* zero or subnormal: mantissa * 2^-24, a normal float */
        float magnitude = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -magnitude : magnitude;
    }
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline uint16_t float_to_half(float f) {
    uint32_t x = float_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((ax >> 13) & 0x3ffu); /* quiet NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;     /* >= 65520 rounds to infinity */
    if (ax < 0x38800000u) {                           /* below 2^-14: subnormal half */
        /* Adding 0.5 puts the value where one float ulp is 2^-24, the subnormal half step,
           so the float addition itself rounds to nearest even. */
        uint32_t sum = float_to_bits(bits_to_float(ax) + 0.5f);
        return sign | (uint16_t)(sum - 0x3f000000u);
    }
    uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd;                          /* rebias exponent by -112, round */
    return sign | (uint16_t)(ax >> 13);
}

static inline float bfloat_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

static inline uint16_t float_to_bfloat(float f) {
    uint32_t x = float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* ---- the per-element arithmetic, one loop per dtype ---- */
#define DEFINE_FLOAT_LOOPS(NAME, T)                                                      \
    static void NAME##_average(T *s, const T *v, int64_t n, T d) {                      \
        for (int64_t i = 0; i < n; i++) {                                                \
            T diff = s[i] - v[i];                                                        \
            T step = diff * d;                                                           \
            s[i] = s[i] - step;                                                          \
        }                                                                                \
    }                                                                                    \
    static void NAME##_debias(T *s, T *b, const T *v, int64_t n, T d, T factor) {       \
        for (int64_t i = 0; i < n; i++) {                                                \
            T diff = b[i] - v[i];                                                        \
            T step = diff * d;                                                           \
            T biased = b[i] - step;                                                      \
            b[i] = biased;                                                               \
            s[i] = biased / factor;                                                      \
        }                                                                                \
    }
DEFINE_FLOAT_LOOPS(f32, float)
DEFINE_FLOAT_LOOPS(f64, double)

/* XLA on the CPU: HLO subtract(s, multiply(subtract(s, v), d)), contracted by LLVM into one
   fused multiply-add. C99 fma/fmaf round once, as the instruction does. */
#define DEFINE_FMA_LOOPS(NAME, T, FMA)                                                   \
    static void NAME##_average_xla(T *s, const T *v, int64_t n, T d) {                  \
        for (int64_t i = 0; i < n; i++) {                                                \
            T diff = s[i] - v[i];                                                        \
            s[i] = FMA(-diff, d, s[i]);                                                  \
        }                                                                                \
    }                                                                                    \
    static void NAME##_debias_xla(T *s, T *b, const T *v, int64_t n, T d, T factor) {   \
        for (int64_t i = 0; i < n; i++) {                                                \
            T diff = b[i] - v[i];                                                        \
            T biased = FMA(-diff, d, b[i]);                                              \
            b[i] = biased;                                                               \
            s[i] = biased / factor;                                                      \
        }                                                                                \
    }
DEFINE_FMA_LOOPS(f32, float, fmaf)
DEFINE_FMA_LOOPS(f64, double, fma)

#define DEFINE_16BIT_LOOPS(NAME, TO_FLOAT, FROM_FLOAT)                                   \
    static void NAME##_average(uint16_t *s, const uint16_t *v, int64_t n, float d) {    \
        for (int64_t i = 0; i < n; i++) {                                                \
            float shadow = TO_FLOAT(s[i]);                                               \
            float diff = TO_FLOAT(FROM_FLOAT(shadow - TO_FLOAT(v[i])));                  \
            float step = TO_FLOAT(FROM_FLOAT(diff * d));                                 \
            s[i] = FROM_FLOAT(shadow - step);                                            \
        }                                                                                \
    }                                                                                    \
    static void NAME##_debias(uint16_t *s, uint16_t *b, const uint16_t *v, int64_t n,   \
                              float d, float factor) {                                   \
        for (int64_t i = 0; i < n; i++) {                                                \
            float biased = TO_FLOAT(b[i]);                                               \
            float diff = TO_FLOAT(FROM_FLOAT(biased - TO_FLOAT(v[i])));                  \
            float step = TO_FLOAT(FROM_FLOAT(diff * d));                                 \
            uint16_t updated = FROM_FLOAT(biased - step);                                \
            b[i] = updated;                                                              \
            s[i] = FROM_FLOAT(TO_FLOAT(updated) / factor);                               \
        }                                                                                \
    }
DEFINE_16BIT_LOOPS(f16, half_to_float, float_to_half)
DEFINE_16BIT_LOOPS(bf16, bfloat_to_float, float_to_bfloat)

/* XLA's float16 (measured): the difference rounded to half, then one fused multiply-add
   rounded once to half. The product and sum are exact in double (11-bit operands); double
   is rounded to float to odd, then float to half to nearest even: one correct rounding. */
static inline uint16_t double_to_half(double x) {
    float f = (float)x;
    if ((double)f != x && (float_to_bits(f) & 1u) == 0 && f == f && f - f == 0)
        f = nextafterf(f, x > (double)f ? INFINITY : -INFINITY);
    return float_to_half(f);
}
static void f16_average_xla(uint16_t *s, const uint16_t *v, int64_t n, float d) {
    for (int64_t i = 0; i < n; i++) {
        float shadow = half_to_float(s[i]);
        float diff = half_to_float(float_to_half(shadow - half_to_float(v[i])));
        s[i] = double_to_half((double)shadow - (double)diff * (double)d);
    }
}
static void f16_debias_xla(uint16_t *s, uint16_t *b, const uint16_t *v, int64_t n, float d,
                           float factor) {
    for (int64_t i = 0; i < n; i++) {
        float biased = half_to_float(b[i]);
        float diff = half_to_float(float_to_half(biased - half_to_float(v[i])));
        uint16_t updated = double_to_half((double)biased - (double)diff * (double)d);
        b[i] = updated;
        s[i] = float_to_half(half_to_float(updated) / factor);
    }
}

static const int64_t ITEM_SIZE[] = {4, 8, 2, 2};

/* Elements [begin, end) of the concatenated tensors. */
static void run_range(int dtype, int64_t ntensors, void *const *shadows, void *const *biased,
                      const void *const *values, const int64_t *numels, double d,
                      const double *factors, int xla, int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (int64_t t = 0; t < ntensors && offset < end; offset += numels[t], t++) {
        int64_t lo = begin > offset ? begin - offset : 0;
        int64_t hi = end - offset < numels[t] ? end - offset : numels[t];
        if (hi <= lo) continue;
        int64_t n = hi - lo, at = lo * ITEM_SIZE[dtype];
        char *s = (char *)shadows[t] + at;
        const char *v = (const char *)values[t] + at;
        char *b = biased ? (char *)biased[t] + at : NULL;
        switch (dtype) {
        case F32:
            if (b && xla) f32_debias_xla((float *)s, (float *)b, (const float *)v, n, (float)d, (float)factors[t]);
            else if (b) f32_debias((float *)s, (float *)b, (const float *)v, n, (float)d, (float)factors[t]);
            else if (xla) f32_average_xla((float *)s, (const float *)v, n, (float)d);
            else f32_average((float *)s, (const float *)v, n, (float)d);
            break;
        case F64:
            if (b && xla) f64_debias_xla((double *)s, (double *)b, (const double *)v, n, d, factors[t]);
            else if (b) f64_debias((double *)s, (double *)b, (const double *)v, n, d, factors[t]);
            else if (xla) f64_average_xla((double *)s, (const double *)v, n, d);
            else f64_average((double *)s, (const double *)v, n, d);
            break;
        case F16:
            if (b && xla) f16_debias_xla((uint16_t *)s, (uint16_t *)b, (const uint16_t *)v, n, (float)d, (float)factors[t]);
            else if (b) f16_debias((uint16_t *)s, (uint16_t *)b, (const uint16_t *)v, n, (float)d, (float)factors[t]);
            else if (xla) f16_average_xla((uint16_t *)s, (const uint16_t *)v, n, (float)d);
            else f16_average((uint16_t *)s, (const uint16_t *)v, n, (float)d);
            break;
        case BF16:   /* XLA rounds every bfloat16 op: the same arithmetic with or without it */
            if (b) bf16_debias((uint16_t *)s, (uint16_t *)b, (const uint16_t *)v, n, (float)d, (float)factors[t]);
            else bf16_average((uint16_t *)s, (const uint16_t *)v, n, (float)d);
            break;
        }
    }
}

/* Below this many elements one thread does it all: waking others costs more than it saves. */
#define PARALLEL_GRAIN 32768

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t item, Py_ssize_t count,
                      const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len != item * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", what, item * count,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* update(dtype, shadows, biased_or_None, values, numels, d, factors_or_None, threads[, xla])
   pointer arrays are uint64 buffers, numels int64, factors float64; xla: 1 for XLA's form. */
static PyObject *update(PyObject *self, PyObject *args) {
    int dtype, threads, xla = 0;
    double d;
    PyObject *shadows_obj, *biased_obj, *values_obj, *numels_obj, *factors_obj;
    if (!PyArg_ParseTuple(args, "iOOOOdOi|p", &dtype, &shadows_obj, &biased_obj, &values_obj,
                          &numels_obj, &d, &factors_obj, &threads, &xla))
        return NULL;
    if (dtype < F32 || dtype > BF16) return PyErr_Format(PyExc_ValueError, "bad dtype code %d", dtype);
    int debias = biased_obj != Py_None;
    if (debias != (factors_obj != Py_None))
        return PyErr_Format(PyExc_ValueError, "biased and factors come together");

    Py_buffer numels_view, shadows_view, values_view, biased_view = {0}, factors_view = {0};
    if (PyObject_GetBuffer(numels_obj, &numels_view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t ntensors = numels_view.len / 8;
    int ok = get_buffer(shadows_obj, &shadows_view, 8, ntensors, "shadows") == 0;
    if (ok && get_buffer(values_obj, &values_view, 8, ntensors, "values") != 0) {
        PyBuffer_Release(&shadows_view);
        ok = 0;
    }
    if (ok && debias) {
        if (get_buffer(biased_obj, &biased_view, 8, ntensors, "biased") != 0) ok = 0;
        else if (get_buffer(factors_obj, &factors_view, 8, ntensors, "factors") != 0) {
            PyBuffer_Release(&biased_view);
            ok = 0;
        }
        if (!ok) { PyBuffer_Release(&shadows_view); PyBuffer_Release(&values_view); }
    }
    if (!ok) { PyBuffer_Release(&numels_view); return NULL; }

    void *const *shadows = (void *const *)shadows_view.buf;
    const void *const *values = (const void *const *)values_view.buf;
    void *const *biased = debias ? (void *const *)biased_view.buf : NULL;
    const double *factors = debias ? (const double *)factors_view.buf : NULL;
    const int64_t *numels = (const int64_t *)numels_view.buf;
    int64_t total = 0;
    for (Py_ssize_t t = 0; t < ntensors; t++) {
        /* A stale plan must never become a write through a null pointer or a wild count. */
        if (numels[t] < 0 || (numels[t] > 0 && (!shadows[t] || !values[t] ||
                                                 (debias && !biased[t])))) {
            PyBuffer_Release(&numels_view);
            PyBuffer_Release(&shadows_view);
            PyBuffer_Release(&values_view);
            if (debias) { PyBuffer_Release(&biased_view); PyBuffer_Release(&factors_view); }
            return PyErr_Format(PyExc_ValueError, "tensor %zd: null pointer or negative size", t);
        }
        total += numels[t];
    }
    if (threads < 1) threads = 1;
    if (total < (int64_t)threads * PARALLEL_GRAIN) threads = (int)(total / PARALLEL_GRAIN) + 1;

    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
            int64_t begin = total * me / team, end = total * (me + 1) / team;
            FLUSH_BEGIN
            run_range(dtype, ntensors, shadows, biased, values, numels, d, factors, xla, begin, end);
            FLUSH_END
        }
    } else
#endif
    {
        FLUSH_BEGIN
        run_range(dtype, ntensors, shadows, biased, values, numels, d, factors, xla, 0, total);
        FLUSH_END
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&numels_view);
    PyBuffer_Release(&shadows_view);
    PyBuffer_Release(&values_view);
    if (debias) { PyBuffer_Release(&biased_view); PyBuffer_Release(&factors_view); }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"update", update, METH_VARARGS, "Fused TF moving-average update over pointer arrays."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
