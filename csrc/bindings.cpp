// pybind11 bindings of fedlora_fast._native: buffers in, checked, handed to the host API in ffa_linear.h.
//
// Arguments are Python buffers (numpy arrays, or torch CPU tensors through Tensor.numpy(): zero-copy).
// Every buffer must be float32 and C-contiguous; nothing is converted or copied here, so a wrong buffer
// is an error naming the argument, never a silent copy. Outputs are written in place and may share no memory
// with another argument (expect_disjoint). No libtorch link.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional<py::buffer> for the arguments that may be None

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <optional>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "ffa_linear.h"

namespace py = pybind11;
namespace ff = fedlora_fast;

namespace {

std::string shape_str(const std::vector<py::ssize_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

// A float32 C-contiguous buffer of the given rank; its shape is checked by the caller.
struct View {
    py::buffer_info info;
    std::vector<py::ssize_t> shape() const { return info.shape; }
    float* data() const { return static_cast<float*>(info.ptr); }
};

View view(const py::buffer& b, const char* name, py::ssize_t ndim, bool writable) {
    py::buffer_info info = b.request(writable);
    if (info.format != py::format_descriptor<float>::format() || info.itemsize != sizeof(float))
        throw py::value_error(std::string(name) + ": expected float32, got buffer format '" + info.format + "'");
    if (info.ndim != ndim)
        throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) + "-D, got shape " +
                              shape_str(info.shape));
    py::ssize_t expect = sizeof(float);
    for (py::ssize_t d = ndim - 1; d >= 0; --d) {
        if (info.shape[d] > 1 && info.strides[d] != expect)
            throw py::value_error(std::string(name) + ": expected a C-contiguous buffer of shape " +
                                  shape_str(info.shape) + " (call .contiguous())");
        expect *= info.shape[d];
    }
    return View{std::move(info)};
}

void expect_shape(const View& v, const char* name, const std::vector<py::ssize_t>& shape) {
    if (v.shape() != shape)
        throw py::value_error(std::string(name) + ": expected shape " + shape_str(shape) + ", got " +
                              shape_str(v.shape()));
}

// An argument for expect_disjoint: its name and view (nullptr: not given).
struct Arg {
    const char* name;
    const View* v;
};

std::pair<const char*, const char*> byte_range(const View& v) {
    const char* lo = static_cast<const char*>(v.info.ptr);
    return {lo, lo + v.info.size * v.info.itemsize};
}

// Every output shares no byte with any other argument: the kernels read inputs after writing outputs (a
// 64-column block of lowrank_out reads L's row after an earlier block wrote out's), so an alias is a wrong
// answer, never a refusal, unless refused here.
void expect_disjoint(std::initializer_list<Arg> outs, std::initializer_list<Arg> all) {
    for (const Arg& o : outs) {
        if (!o.v || o.v->info.size == 0) continue;
        const auto [olo, ohi] = byte_range(*o.v);
        for (const Arg& a : all) {
            if (!a.v || a.v == o.v || a.v->info.size == 0) continue;
            const auto [alo, ahi] = byte_range(*a.v);
            if (olo < ahi && alo < ohi)
                throw py::value_error(std::string(o.name) + ": expected an output buffer sharing no memory with " +
                                      a.name + ", got overlapping buffers");
        }
    }
}

const View* given(const std::optional<View>& v) { return v ? &*v : nullptr; }

void bwd(const py::buffer& g, const py::buffer& u, const py::buffer& B, std::optional<py::buffer> xa,
         std::optional<py::buffer> v, const py::buffer& gB, std::optional<py::buffer> nuB,
         std::optional<py::buffer> gA, std::optional<py::buffer> nuA, float scale, int mode, double clip_B,
         double clip_A) {
    if (mode != ff::MODE_SUM && mode != ff::MODE_PER_SAMPLE && mode != ff::MODE_CLIP)  // output ranks depend on it
        throw py::value_error("mode: expected 0 (sum), 1 (per-sample) or 2 (clip), got " + std::to_string(mode));
    const View vg = view(g, "g", 3, false), vu = view(u, "u", 3, false), vB = view(B, "B", 2, false);
    ff::FfaLinearBwdParams p;
    p.n = vg.shape()[0];
    p.T = vg.shape()[1];
    p.out = vg.shape()[2];
    p.r = vB.shape()[1];
    expect_shape(vB, "B", {p.out, p.r});
    expect_shape(vu, "u", {p.n, p.T, p.r});
    p.g = vg.data();
    p.u = vu.data();
    p.B = vB.data();
    p.scale = scale;
    p.mode = mode;
    // a finite threshold beyond float32's range clips nothing (c = 1), as FLT_MAX does; inf and NaN stay
    // themselves (refused by the checks)
    const auto threshold = [](double c) {
        return static_cast<float>(std::isfinite(c) ? std::min(c, static_cast<double>(FLT_MAX)) : c);
    };
    p.clip_B = threshold(clip_B);
    p.clip_A = threshold(clip_A);
    const bool per_sample = mode == ff::MODE_PER_SAMPLE;
    std::optional<View> vxa, vv, vnuB, vgA, vnuA;
    if (xa) {
        vxa = view(*xa, "xa", 3, false);
        p.in = vxa->shape()[2];
        expect_shape(*vxa, "xa", {p.n, p.T, p.in});
        p.xa = vxa->data();
    }
    if (v) {
        vv = view(*v, "v", 3, true);
        expect_shape(*vv, "v", {p.n, p.T, p.r});
        p.v = vv->data();
    }
    const View vgB = view(gB, "gB", per_sample ? 3 : 2, true);
    using Shape = std::vector<py::ssize_t>;
    expect_shape(vgB, "gB", per_sample ? Shape{p.n, p.out, p.r} : Shape{p.out, p.r});
    p.gB = vgB.data();
    if (nuB && mode != ff::MODE_SUM) {
        vnuB = view(*nuB, "nuB", 1, true);
        expect_shape(*vnuB, "nuB", {p.n});
        p.nuB = vnuB->data();
    }
    if (xa) {
        if (!gA) throw py::value_error("gA: an output buffer is required when xa is given (LoRA mode)");
        vgA = view(*gA, "gA", per_sample ? 3 : 2, true);
        expect_shape(*vgA, "gA", per_sample ? Shape{p.n, p.r, p.in} : Shape{p.r, p.in});
        p.gA = vgA->data();
        if (nuA && mode != ff::MODE_SUM) {
            vnuA = view(*nuA, "nuA", 1, true);
            expect_shape(*vnuA, "nuA", {p.n});
            p.nuA = vnuA->data();
        }
    }
    const std::initializer_list<Arg> outs = {{"v", given(vv)}, {"gB", &vgB}, {"nuB", given(vnuB)},
                                             {"gA", given(vgA)}, {"nuA", given(vnuA)}};
    expect_disjoint(outs, {{"g", &vg}, {"u", &vu}, {"B", &vB}, {"xa", given(vxa)}, {"v", given(vv)}, {"gB", &vgB},
                           {"nuB", given(vnuB)}, {"gA", given(vgA)}, {"nuA", given(vnuA)}});
    py::gil_scoped_release release;
    ff::ffa_linear_bwd(p);
}

void clip_reduce(const py::buffer& P, const py::buffer& coef, const py::buffer& out) {
    const View vP = view(P, "P", 3, false), vc = view(coef, "coef", 1, false), vo = view(out, "out", 2, true);
    const auto s = vP.shape();
    expect_shape(vc, "coef", {s[0]});
    expect_shape(vo, "out", {s[1], s[2]});
    expect_disjoint({{"out", &vo}}, {{"P", &vP}, {"coef", &vc}});
    ff::ClipReduceParams p;
    p.P = vP.data();
    p.coef = vc.data();
    p.out = vo.data();
    p.n = s[0];
    p.numel = s[1] * s[2];
    py::gil_scoped_release release;
    ff::ffa_linear_clip_reduce(p);
}

// U = X R^T: X (n, T, cols), R (r, cols), out (n, T, r)
void lowrank_in(const py::buffer& X, const py::buffer& R, const py::buffer& out) {
    const View vX = view(X, "x", 3, false), vR = view(R, "A", 2, false), vo = view(out, "u", 3, true);
    const auto s = vX.shape();
    const py::ssize_t r = vR.shape()[0];
    expect_shape(vR, "A", {r, s[2]});
    expect_shape(vo, "u", {s[0], s[1], r});
    expect_disjoint({{"u", &vo}}, {{"x", &vX}, {"A", &vR}});
    ff::LowRankParams p;
    p.X = vX.data();
    p.R = vR.data();
    p.out = vo.data();
    p.N = s[0] * s[1];
    p.cols = s[2];
    p.r = r;
    py::gil_scoped_release release;
    ff::lowrank_in(p);
}

// out (n, T, cols) (+)= scale * L R: L (n, T, r), R (r, cols)
void lowrank_out(const py::buffer& L, const py::buffer& R, const py::buffer& out, float scale, bool accumulate) {
    const View vL = view(L, "L", 3, false), vR = view(R, "R", 2, false), vo = view(out, "out", 3, true);
    const auto s = vL.shape();
    const py::ssize_t cols = vR.shape()[1];
    expect_shape(vR, "R", {s[2], cols});
    expect_shape(vo, "out", {s[0], s[1], cols});
    expect_disjoint({{"out", &vo}}, {{"L", &vL}, {"R", &vR}});
    ff::LowRankParams p;
    p.X = vL.data();
    p.R = vR.data();
    p.out = vo.data();
    p.N = s[0] * s[1];
    p.cols = cols;
    p.r = s[2];
    p.scale = scale;
    p.accumulate = accumulate;
    py::gil_scoped_release release;
    ff::lowrank_out(p);
}

py::dict build_info() {
    py::dict d;
#ifdef FEDLORA_FAST_COMPILER
    d["compiler"] = FEDLORA_FAST_COMPILER;
#endif
#ifdef FEDLORA_FAST_FLAGS
    d["flags"] = FEDLORA_FAST_FLAGS;
#endif
#ifdef _OPENMP
    d["openmp"] = _OPENMP;
#else
    d["openmp"] = py::none();
#endif
    d["max_threads"] = ff::max_threads();
    d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                    std::to_string(PYBIND11_VERSION_PATCH);
#ifdef FEDLORA_FAST_SANITIZERS
    d["sanitizers"] = FEDLORA_FAST_SANITIZERS;  // empty string: none
#endif
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#else
    d["simd"] = "baseline";
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "fedlora_fast native CPU kernels (C++17/OpenMP) of the ffa_linear ops over float32 buffers.";
    m.attr("MODE_SUM") = static_cast<int>(ff::MODE_SUM);
    m.attr("MODE_PER_SAMPLE") = static_cast<int>(ff::MODE_PER_SAMPLE);
    m.attr("MODE_CLIP") = static_cast<int>(ff::MODE_CLIP);
    m.def("ffa_linear_bwd", &bwd, py::arg("g"), py::arg("u"), py::arg("B"), py::arg("xa").none(true),
          py::arg("v").none(true), py::arg("gB"), py::arg("nuB").none(true), py::arg("gA").none(true),
          py::arg("nuA").none(true), py::arg("scale"), py::arg("mode"), py::arg("clip_B"), py::arg("clip_A"),
          "Adapter part of the fused ffa_linear backward, written into the given buffers.\n\n"
          "g (n,T,out), u (n,T,r), B (out,r), xa (n,T,in) or None (FFA mode). Writes v = g B (n,T,r) if v is\n"
          "given; gB = the per-sample s g_i^T u_i (n,out,r) for mode 1, else their sum (mode 0) or clipped sum\n"
          "(mode 2, threshold clip_B) (out,r); nuB (n,) their squared norms (modes 1, 2); in LoRA mode gA, nuA\n"
          "likewise for s v_i^T xa_i (r,in) with clip_A. All float32 C-contiguous; the GIL is released.");
    m.def("ffa_linear_clip_reduce", &clip_reduce, py::arg("P"), py::arg("coef"), py::arg("out"),
          "out (a,b) = sum_i coef_i P_i over P (n,a,b), skipping samples with coef_i == 0; float32 buffers.");
    m.def("lowrank_in", &lowrank_in, py::arg("x"), py::arg("A"), py::arg("u"),
          "u (n,T,r) = x (n,T,in) A^T for A (r,in): the forward's U = Xa A^T; float32 buffers.");
    m.def("lowrank_out", &lowrank_out, py::arg("L"), py::arg("R"), py::arg("out"), py::arg("scale"),
          py::arg("accumulate"),
          "out (n,T,cols) = [out +] scale * L (n,T,r) R (r,cols): Y += s U B^T (R = B^T) or dXa = s V A.");
    m.def("build_info", &build_info,
          "What this module was built with: compiler, flags, OpenMP version, SIMD level, threads, sanitizers.");
    m.def("max_threads", &ff::max_threads, "Number of OpenMP threads the kernels use (OMP_NUM_THREADS).");
}
