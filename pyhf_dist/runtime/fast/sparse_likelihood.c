/*
 * The HistFactory likelihood's -2 log L and its gradient, one dataset at a time, on sparse tables.
 *
 * The arithmetic of pyhf_dist/runtime/fast/likelihood.py (Functions.value_and_grad), written out
 * with its gradient by hand. The jax function spends ~70 us per call on a 1Lbb patch, mostly in
 * the fixed cost of its ~60 small XLA kernels and in dense tables that are 60% zeros; here the
 * same sums run over the non-zero entries only, in one pass forward and one back.
 *
 * A Likelihood is built once per patch from the tables that pyhf_dist/runtime/fast/native.py
 * extracts from the patch's padded layout (every index is checked here, once); calling it with
 * (theta, main, aux, out) writes [-2 log L, gradient...] into out. It keeps its workspace, so one
 * object must not be called from two threads at once: it holds the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Expected yields of bins with data are floored here (likelihood.YIELD_FLOOR). */
#define YIELD_FLOOR 1e-10

enum { NORM_CODE1 = 1, NORM_CODE4 = 4 };
enum { HIST_CODE0 = 0, HIST_CODE2 = 2, HIST_CODE4P = 5 };

typedef struct {
    PyObject_HEAD
    Py_ssize_t n, bins, slots, width, factors, cells;
    Py_ssize_t hist_rows, hist_entries, norm_rows, norm_entries;
    int norm_code, hist_code;
    /* histosys: rows (one per parameter entry), their cells and the X1, X2 tables */
    int32_t *hist_par, *hist_ptr, *hist_cell;
    double *hist_x1, *hist_x2;
    /* normsys: rows (one per parameter entry), each with its entries (slots); the code4
     * coefficients stored by power, then entry (coef[k * entries + e]), so that a row's
     * polynomials are computed along contiguous arrays */
    int32_t *norm_par, *norm_ptr, *norm_slot;
    double *norm_log_hi, *norm_log_lo, *norm_coef;
    /* the cells (slot, bin of the slot) */
    double *nominal;
    int32_t *bin_index, *factor_par;
    /* bins and parameters */
    uint8_t *bin_used, *gauss, *poisson;
    double *sigma, *tau;
    /* workspace */
    double *ext, *grad, *c1, *c2, *dc1, *dc2;
    double *hi_sel, *lo_sel, *d_hi, *d_lo;
    uint8_t *inside;
    double *outer, *nonzero_product, *norm, *outer_exp, *g_norm, *g_outer, *g_poly;
    int32_t *zeros;
    int any_zero;
    double *q, *base, *factor, *g_cell, *yields, *d_yields;
    void *memory;
} Likelihood;

static void Likelihood_dealloc(Likelihood *self)
{
    PyMem_Free(self->memory);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One table argument: a contiguous buffer of `count` items of `itemsize` bytes (count < 0: any). */
static int take(PyObject *object, Py_ssize_t itemsize, Py_ssize_t count, const char *name, char **cursor,
                void **into, Py_ssize_t *found)
{
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view.itemsize != itemsize || view.len % itemsize || (count >= 0 && view.len / itemsize != count)) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes of items of %zd, expected %zd items of %zd bytes", name,
                     view.len, view.itemsize, count, itemsize);
        PyBuffer_Release(&view);
        return -1;
    }
    if (*cursor != NULL) {
        memcpy(*cursor, view.buf, view.len);
        *into = *cursor;
        *cursor += (view.len + 7) / 8 * 8;
    }
    if (found != NULL)
        *found = view.len / itemsize;
    PyBuffer_Release(&view);
    return 0;
}

static int within(const int32_t *values, Py_ssize_t count, Py_ssize_t low, Py_ssize_t high, const char *name)
{
    for (Py_ssize_t i = 0; i < count; i++)
        if (values[i] < low || values[i] > high) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %d is outside [%zd, %zd]", name, i, values[i], low, high);
            return -1;
        }
    return 0;
}

static int pointers(const int32_t *ptr, Py_ssize_t rows, Py_ssize_t entries, const char *name)
{
    if (ptr[0] != 0 || ptr[rows] != entries) {
        PyErr_Format(PyExc_ValueError, "%s must run from 0 to %zd", name, entries);
        return -1;
    }
    for (Py_ssize_t i = 0; i < rows; i++)
        if (ptr[i + 1] < ptr[i]) {
            PyErr_Format(PyExc_ValueError, "%s must not decrease", name);
            return -1;
        }
    return 0;
}

#define TABLES 19

/* An __init__ that failed after its allocation leaves no tables behind: calls then refuse. */
static int unusable(Likelihood *self)
{
    PyMem_Free(self->memory);
    self->memory = NULL;
    return -1;
}

static int Likelihood_init(Likelihood *self, PyObject *args, PyObject *kwargs)
{
    static const char *names[TABLES] = {
        "hist_par", "hist_ptr", "hist_cell", "hist_x1", "hist_x2", "norm_par", "norm_ptr", "norm_slot",
        "norm_log_hi", "norm_log_lo", "norm_coef", "nominal", "bin_index", "factor_par", "bin_used",
        "gauss", "poisson", "sigma", "tau",
    };
    static const Py_ssize_t sizes[TABLES] = {4, 4, 4, 8, 8, 4, 4, 4, 8, 8, 8, 8, 4, 4, 1, 1, 1, 8, 8};
    Py_ssize_t n, bins, width, factors;
    int norm_code, hist_code;
    PyObject *tables;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "Likelihood takes positional arguments only");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "nnnniiO!", &n, &bins, &width, &factors, &norm_code, &hist_code, &PyTuple_Type,
                          &tables))
        return -1;
    if (PyTuple_GET_SIZE(tables) != TABLES) {
        PyErr_Format(PyExc_ValueError, "expected %d tables", TABLES);
        return -1;
    }
    if (n < 1 || bins < 1 || width < 1 || factors < 0 ||
        (norm_code != NORM_CODE1 && norm_code != NORM_CODE4) ||
        (hist_code != HIST_CODE0 && hist_code != HIST_CODE2 && hist_code != HIST_CODE4P)) {
        PyErr_SetString(PyExc_ValueError, "bad sizes or interpolation codes");
        return -1;
    }
    Py_ssize_t counts[TABLES];
    Py_ssize_t total = 0;
    char *none = NULL;
    for (int i = 0; i < TABLES; i++) {
        if (take(PyTuple_GET_ITEM(tables, i), sizes[i], -1, names[i], &none, NULL, &counts[i]) < 0)
            return -1;
        total += (counts[i] * sizes[i] + 7) / 8 * 8;
    }
    Py_ssize_t hist_rows = counts[0], norm_rows = counts[5], cells = counts[11];
    Py_ssize_t slots = cells / width;
    if (counts[1] != hist_rows + 1 || counts[3] != counts[2] || counts[4] != counts[2] || counts[6] != norm_rows + 1 ||
        counts[8] != counts[7] || counts[9] != counts[7] ||
        counts[10] != (norm_code == NORM_CODE4 ? 6 * counts[7] : 0) || cells != slots * width ||
        counts[12] != cells || counts[13] != cells * factors || counts[14] != bins || counts[15] != n ||
        counts[16] != n || counts[17] != n || counts[18] != n) {
        PyErr_SetString(PyExc_ValueError, "the tables' sizes do not agree with one another");
        return -1;
    }
    Py_ssize_t doubles = (n + 1) * 2 + hist_rows * 4 + norm_rows * 4 + slots * 8 + counts[7] + cells * 3 +
                         (bins + 1) * 2;
    Py_ssize_t bytes = total + doubles * 8 + (norm_rows + 7) / 8 * 8;
    PyMem_Free(self->memory);
    self->memory = PyMem_Calloc(1, bytes > 0 ? bytes : 8);
    if (self->memory == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    char *cursor = self->memory;
    void **into[TABLES] = {
        (void **)&self->hist_par, (void **)&self->hist_ptr, (void **)&self->hist_cell, (void **)&self->hist_x1,
        (void **)&self->hist_x2, (void **)&self->norm_par, (void **)&self->norm_ptr, (void **)&self->norm_slot,
        (void **)&self->norm_log_hi, (void **)&self->norm_log_lo, (void **)&self->norm_coef,
        (void **)&self->nominal, (void **)&self->bin_index, (void **)&self->factor_par,
        (void **)&self->bin_used, (void **)&self->gauss, (void **)&self->poisson, (void **)&self->sigma,
        (void **)&self->tau,
    };
    for (int i = 0; i < TABLES; i++)
        if (take(PyTuple_GET_ITEM(tables, i), sizes[i], counts[i], names[i], &cursor, into[i], NULL) < 0)
            return unusable(self);
    double *work = (double *)cursor;
    self->ext = work, work += n + 1;
    self->grad = work, work += n + 1;
    self->c1 = work, work += hist_rows;
    self->c2 = work, work += hist_rows;
    self->dc1 = work, work += hist_rows;
    self->dc2 = work, work += hist_rows;
    self->hi_sel = work, work += norm_rows;
    self->lo_sel = work, work += norm_rows;
    self->d_hi = work, work += norm_rows;
    self->d_lo = work, work += norm_rows;
    self->outer = work, work += slots;
    self->nonzero_product = work, work += slots;
    self->norm = work, work += slots;
    self->outer_exp = work, work += slots;
    self->g_norm = work, work += slots;
    self->g_outer = work, work += slots;
    self->g_poly = work, work += slots;
    self->zeros = (int32_t *)work, work += slots; /* a double's room each */
    self->q = work, work += counts[7];
    self->base = work, work += cells;
    self->factor = work, work += cells;
    self->g_cell = work, work += cells;
    self->yields = work, work += bins + 1;
    self->d_yields = work, work += bins + 1;
    self->inside = (uint8_t *)work;

    self->n = n, self->bins = bins, self->slots = slots, self->width = width, self->factors = factors;
    self->cells = cells, self->hist_rows = hist_rows, self->hist_entries = counts[2];
    self->norm_rows = norm_rows, self->norm_entries = counts[7];
    self->norm_code = norm_code, self->hist_code = hist_code;
    /* Every index is checked once here, so that a call never reads outside its tables. */
    if (within(self->hist_par, hist_rows, 0, n, "hist_par") < 0 ||
        pointers(self->hist_ptr, hist_rows, counts[2], "hist_ptr") < 0 ||
        within(self->hist_cell, counts[2], 0, cells - 1, "hist_cell") < 0 ||
        within(self->norm_par, norm_rows, 0, n, "norm_par") < 0 ||
        pointers(self->norm_ptr, norm_rows, counts[7], "norm_ptr") < 0 ||
        within(self->norm_slot, counts[7], 0, slots - 1, "norm_slot") < 0 ||
        within(self->bin_index, cells, 0, bins, "bin_index") < 0 ||
        within(self->factor_par, cells * factors, 0, n, "factor_par") < 0)
        return unusable(self);
    return 0;
}

static void histosys_coefficients(Likelihood *self)
{
    const double *ext = self->ext;
    for (Py_ssize_t h = 0; h < self->hist_rows; h++) {
        double a = ext[self->hist_par[h]];
        double c1, c2, dc1, dc2;
        if (self->hist_code == HIST_CODE0) {
            c1 = a > 0 ? a : 0.0, dc1 = a > 0 ? 1.0 : 0.0;
            c2 = a > 0 ? 0.0 : a, dc2 = a > 0 ? 0.0 : 1.0;
        } else if (self->hist_code == HIST_CODE2) {
            if (a > 1)
                c1 = 2.0 * (a - 1.0), dc1 = 2.0;
            else if (a >= -1)
                c1 = a * a, dc1 = 2.0 * a;
            else
                c1 = -2.0 * a, dc1 = -2.0;
            c2 = a > 1 ? a - 1.0 : a, dc2 = 1.0;
        } else {
            c1 = a, dc1 = 1.0;
            if (a > 1)
                c2 = 8.0 * a, dc2 = 8.0;
            else if (a < -1)
                c2 = -8.0 * a, dc2 = -8.0;
            else {
                double a2 = a * a;
                c2 = a2 * (a2 * (a2 * 3.0 - 10.0) + 15.0);
                dc2 = a * (a2 * (a2 * 18.0 - 40.0) + 30.0);
            }
        }
        self->c1[h] = c1, self->c2[h] = c2, self->dc1[h] = dc1, self->dc2[h] = dc2;
    }
}

static void normsys_rows(Likelihood *self)
{
    const double *ext = self->ext;
    for (Py_ssize_t r = 0; r < self->norm_rows; r++) {
        double a = ext[self->norm_par[r]];
        if (self->norm_code == NORM_CODE1) {
            self->hi_sel[r] = a > 0 ? a : 0.0, self->d_hi[r] = a > 0 ? 1.0 : 0.0;
            self->lo_sel[r] = a > 0 ? 0.0 : -a, self->d_lo[r] = a > 0 ? 0.0 : -1.0;
            self->inside[r] = 0;
        } else {
            self->hi_sel[r] = a >= 1 ? a : 0.0, self->d_hi[r] = a >= 1 ? 1.0 : 0.0;
            self->lo_sel[r] = a <= -1 ? -a : 0.0, self->d_lo[r] = a <= -1 ? -1.0 : 0.0;
            self->inside[r] = a > -1 && a < 1;
        }
    }
}

/* The normsys factor of every slot: exp(outer) times the product of the code4 polynomials of
 * the parameters inside (-1, 1). Products are kept without their zero factors (counted apart),
 * so that the gradient can divide by a factor. */
static void normsys_forward(Likelihood *self)
{
    const Py_ssize_t entries = self->norm_entries;
    const double *ext = self->ext;
    for (Py_ssize_t s = 0; s < self->slots; s++)
        self->outer[s] = 0.0, self->nonzero_product[s] = 1.0, self->zeros[s] = 0;
    self->any_zero = 0;
    for (Py_ssize_t r = 0; r < self->norm_rows; r++) {
        const int32_t first = self->norm_ptr[r], last = self->norm_ptr[r + 1];
        const int32_t *slot = self->norm_slot;
        const double hi = self->hi_sel[r], lo = self->lo_sel[r];
        if (hi != 0.0 || lo != 0.0)
            for (int32_t e = first; e < last; e++)
                self->outer[slot[e]] += hi * self->norm_log_hi[e] + lo * self->norm_log_lo[e];
        if (!self->inside[r])
            continue;
        const double a = ext[self->norm_par[r]];
        const double p1 = a, p2 = a * a, p3 = p2 * a, p4 = p2 * p2, p5 = p4 * a, p6 = p3 * p3;
        const double *k0 = self->norm_coef, *k1 = k0 + entries, *k2 = k1 + entries, *k3 = k2 + entries,
                     *k4 = k3 + entries, *k5 = k4 + entries;
        double *q = self->q;
        for (int32_t e = first; e < last; e++)
            q[e] = 1.0 + ((k0[e] * p1 + k1[e] * p2) + (k2[e] * p3 + k3[e] * p4) + (k4[e] * p5 + k5[e] * p6));
        for (int32_t e = first; e < last; e++) {
            if (q[e] != 0.0)
                self->nonzero_product[slot[e]] *= q[e];
            else
                self->zeros[slot[e]] += 1, self->any_zero = 1;
        }
    }
    for (Py_ssize_t s = 0; s < self->slots; s++) {
        self->outer_exp[s] = exp(self->outer[s]);
        self->norm[s] = self->zeros[s] ? 0.0 : self->outer_exp[s] * self->nonzero_product[s];
    }
}

/* The normsys parameters' gradient from g_norm (d(sum of terms) / d norm, per slot). */
static void normsys_backward(Likelihood *self)
{
    const Py_ssize_t entries = self->norm_entries;
    const double *ext = self->ext;
    const int32_t *slot = self->norm_slot;
    for (Py_ssize_t s = 0; s < self->slots; s++) {
        self->g_outer[s] = self->g_norm[s] * self->norm[s];
        /* d norm / d q_e = exp(outer) * (the product of the slot's other factors) */
        self->g_poly[s] = self->g_norm[s] * self->outer_exp[s] * self->nonzero_product[s];
    }
    for (Py_ssize_t r = 0; r < self->norm_rows; r++) {
        const int32_t first = self->norm_ptr[r], last = self->norm_ptr[r + 1];
        double along = 0.0, along_odd = 0.0;
        const double d_hi = self->d_hi[r], d_lo = self->d_lo[r];
        if (d_hi != 0.0 || d_lo != 0.0)
            for (int32_t e = first; e < last; e++)
                along += self->g_outer[slot[e]] * (d_hi * self->norm_log_hi[e] + d_lo * self->norm_log_lo[e]);
        if (self->inside[r]) {
            const double a = ext[self->norm_par[r]];
            const double s1 = 1.0, s2 = 2.0 * a, s3 = 3.0 * a * a, s4 = 4.0 * a * a * a, s5 = 5.0 * a * a * a * a,
                         s6 = 6.0 * a * a * a * a * a;
            const double *k0 = self->norm_coef, *k1 = k0 + entries, *k2 = k1 + entries, *k3 = k2 + entries,
                         *k4 = k3 + entries, *k5 = k4 + entries;
            const double *q = self->q;
            int32_t e = first;
            if (!self->any_zero) {
                for (; e + 1 < last; e += 2) {
                    const double d0 = (k0[e] * s1 + k1[e] * s2) + (k2[e] * s3 + k3[e] * s4) + (k4[e] * s5 + k5[e] * s6);
                    const double d1 = (k0[e + 1] * s1 + k1[e + 1] * s2) + (k2[e + 1] * s3 + k3[e + 1] * s4) +
                                      (k4[e + 1] * s5 + k5[e + 1] * s6);
                    along += self->g_poly[slot[e]] * d0 / q[e];
                    along_odd += self->g_poly[slot[e + 1]] * d1 / q[e + 1];
                }
            }
            for (; e < last; e++) {
                const double d = (k0[e] * s1 + k1[e] * s2) + (k2[e] * s3 + k3[e] * s4) + (k4[e] * s5 + k5[e] * s6);
                const int32_t zeros = self->zeros[slot[e]];
                if (zeros == 0)
                    along += self->g_poly[slot[e]] * d / q[e];
                else if (zeros == 1 && q[e] == 0.0) /* the slot's only zero factor: the others' product */
                    along += self->g_poly[slot[e]] * d;
            }
        }
        self->grad[self->norm_par[r]] += along + along_odd;
    }
}

/* -2 log L at theta for (main, aux) into out[0], its gradient into out[1:]. */
static void evaluate(Likelihood *self, const double *theta, const double *main_data, const double *aux,
                     double *out)
{
    const Py_ssize_t n = self->n, cells = self->cells, width = self->width, factors = self->factors;
    double *ext = self->ext, *grad = self->grad;
    memcpy(ext, theta, n * sizeof(double));
    ext[n] = 1.0; /* padding entries of the index tables point here */
    memset(grad, 0, (n + 1) * sizeof(double));

    /* Forward: yields. */
    histosys_coefficients(self);
    memcpy(self->base, self->nominal, cells * sizeof(double));
    for (Py_ssize_t h = 0; h < self->hist_rows; h++) {
        const double c1 = self->c1[h], c2 = self->c2[h];
        for (int32_t e = self->hist_ptr[h]; e < self->hist_ptr[h + 1]; e++)
            self->base[self->hist_cell[e]] += c1 * self->hist_x1[e] + c2 * self->hist_x2[e];
    }
    normsys_rows(self);
    normsys_forward(self);
    double *yields = self->yields;
    memset(yields, 0, (self->bins + 1) * sizeof(double));
    for (Py_ssize_t c = 0; c < cells; c++) {
        double factor = 1.0;
        for (Py_ssize_t f = 0; f < factors; f++)
            factor *= ext[self->factor_par[c * factors + f]];
        self->factor[c] = factor;
        yields[self->bin_index[c]] += self->base[c] * self->norm[c / width] * factor;
    }

    /* The terms: main data, then the constraints. */
    double total = 0.0;
    double *d_yields = self->d_yields;
    for (Py_ssize_t b = 0; b < self->bins; b++) {
        d_yields[b] = 0.0;
        if (!self->bin_used[b])
            continue;
        const double observed = main_data[b], y = yields[b];
        if (observed > 0) {
            const double lam = y > YIELD_FLOOR ? y : YIELD_FLOOR;
            const double excess = lam / observed - 1.0;
            total += observed * (log1p(excess) - excess);
            d_yields[b] = (1.0 / (1.0 + excess) - 1.0) * (y > YIELD_FLOOR ? 1.0 : y == YIELD_FLOOR ? 0.5 : 0.0);
        } else {
            total -= y;
            d_yields[b] = -1.0;
        }
    }
    d_yields[self->bins] = 0.0; /* the bin that padding cells add to */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (self->gauss[i]) {
            const double z = (aux[i] - ext[i]) / self->sigma[i];
            total -= 0.5 * z * z;
            grad[i] += z / self->sigma[i];
        } else if (self->poisson[i]) {
            const double rate = ext[i] * self->tau[i], observed = aux[i];
            if (observed > 0) {
                const double excess = rate / observed - 1.0;
                total += observed * (log1p(excess) - excess);
                grad[i] += (1.0 / (1.0 + excess) - 1.0) * self->tau[i];
            } else {
                total -= rate;
                grad[i] -= self->tau[i];
            }
        }
    }

    /* Backward: cells, then their factors, the histosys and the normsys parameters. */
    memset(self->g_norm, 0, self->slots * sizeof(double));
    for (Py_ssize_t c = 0; c < cells; c++) {
        const Py_ssize_t s = c / width;
        const double g = d_yields[self->bin_index[c]], base = self->base[c], norm = self->norm[s];
        self->g_cell[c] = g * norm * self->factor[c];
        self->g_norm[s] += g * base * self->factor[c];
        const int32_t *pars = self->factor_par + c * factors;
        for (Py_ssize_t f = 0; f < factors; f++) {
            double others = g * base * norm;
            for (Py_ssize_t o = 0; o < factors; o++)
                if (o != f)
                    others *= ext[pars[o]];
            grad[pars[f]] += others;
        }
    }
    for (Py_ssize_t h = 0; h < self->hist_rows; h++) {
        double along1 = 0.0, along2 = 0.0;
        for (int32_t e = self->hist_ptr[h]; e < self->hist_ptr[h + 1]; e++) {
            const double g = self->g_cell[self->hist_cell[e]];
            along1 += g * self->hist_x1[e];
            along2 += g * self->hist_x2[e];
        }
        grad[self->hist_par[h]] += self->dc1[h] * along1 + self->dc2[h] * along2;
    }
    normsys_backward(self);
    out[0] = -2.0 * total;
    for (Py_ssize_t i = 0; i < n; i++)
        out[i + 1] = -2.0 * grad[i];
}

static PyObject *Likelihood_call(Likelihood *self, PyObject *args, PyObject *kwargs)
{
    Py_buffer theta, main_data, aux, out;
    if (self->memory == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Likelihood not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &theta, &main_data, &aux, &out))
        return NULL;
    PyObject *result = NULL;
    if (theta.len != self->n * 8 || main_data.len != self->bins * 8 || aux.len != self->n * 8 ||
        out.len != (self->n + 1) * 8)
        PyErr_Format(PyExc_ValueError, "expected float64 theta and aux of %zd, main of %zd and out of %zd", self->n,
                     self->bins, self->n + 1);
    else {
        evaluate(self, theta.buf, main_data.buf, aux.buf, out.buf);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&theta);
    PyBuffer_Release(&main_data);
    PyBuffer_Release(&aux);
    PyBuffer_Release(&out);
    return result;
}

static PyTypeObject LikelihoodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyhf_dist.runtime.fast.sparse_likelihood.Likelihood",
    .tp_doc = PyDoc_STR("Likelihood(n, bins, width, factors, norm_code, hist_code, tables): "
                        "call with (theta, main, aux, out) to write [-2 log L, gradient...] into out."),
    .tp_basicsize = sizeof(Likelihood),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Likelihood_init,
    .tp_dealloc = (destructor)Likelihood_dealloc,
    .tp_call = (ternaryfunc)Likelihood_call,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sparse_likelihood",
    .m_doc = "The HistFactory likelihood's value and gradient on sparse tables (see native.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit_sparse_likelihood(void)
{
    if (PyType_Ready(&LikelihoodType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Likelihood", (PyObject *)&LikelihoodType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
