// FoldedMoE as one ONNX Runtime operator (domain "ai.geomoe"): the MoE layer of `geomoe.model.folded_moe` in a
// single call. As 23 standard operations the layer costs ONNX Runtime more in dispatch than in arithmetic (the last
// block's, 64 pixels x 128 channels: 40-55 us on one thread, 60-110 on two, for 0.4 M multiply-adds); here it runs
// whole on the calling thread (22-26 us), so no small operation wakes a second thread either.
//
// Inputs (float32), as `geomoe.camera.fused_moe.FusedMoE` exports them:
//   x (B, C, P, N): the tokens, P pixels of N patches;
//   weight1 (C, E*H + R): the held experts' first layers, then the router's projection (min-max scale folded in);
//   bias1 (E*H + R): their biases, then minus the scale's minimum projected;
//   keys (R, E_all): every expert's key, held experts first, unit length times the inverse temperature;
//   weight2 (E*H + E, C): the experts' second layers, then each expert's output shift.
// Attributes: num_held (E), hidden (H), eps (the GroupNorm's), image_routing, remove_absent (0 or 1).
// Output: (B, C, P, N), the layer's residual branch.
//
// The arithmetic and decisions are FoldedMoE's: a one-group GroupNorm without affine; per patch (or per image) a
// softmax over every expert; the best held expert by probability, its probability the gate; with remove_absent,
// -x where the best absent expert beats it. Float rounding differs (sums in other orders, a vectorised exp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

namespace {

using Ort::Custom::Tensor;

constexpr int kTile = 16;  // pixels summed together in registers: one AVX-512 register, two AVX or four NEON
// Independent sums per pass (units of the first layer, channels of the second), so that a sum does not wait on
// its own last multiply-add (4 cycles): with one, the experts took 4x as long. Four tiles fit NEON's 32 registers.
constexpr int kChains = 4;
using Tile = float __attribute__((vector_size(kTile * sizeof(float))));  // GCC and Clang vector extension

// exp with its argument kept to [-87, 87], where the result is a normal float: denormals cost a hundred cycles
// each (the softmax of experts far from the best one made the last layers 50% slower). Against exact exp the
// softmax changes by under 1e-37, and SiLU by under 1e-36.
inline float Exp(float v) { return std::exp(std::min(std::max(v, -87.f), 87.f)); }

inline Tile LoadTile(const float* from) {
  Tile tile;
  std::memcpy(&tile, from, sizeof tile);
  return tile;
}

struct LayerAttributes {
  int held = 0;            // E: experts this model holds, first among the keys
  int hidden = 0;          // H: hidden units per expert
  float eps = 1e-5f;       // the GroupNorm's
  bool image_routing = false;  // one decision per image, from its mean token, instead of one per patch
  bool remove_absent = false;  // a patch whose best expert is absent gets -x (MLP_e(x) <- -x)
};

// The sum of v - centre, or with squares of (v - centre)^2: kChains tiles at once (a single running sum waits on
// its own last add).
float Sum(const float* __restrict v, int n, float centre, bool squares) {
  Tile acc[kChains] = {};
  int i = 0;
  for (; i + kChains * kTile <= n; i += kChains * kTile)
    for (int k = 0; k < kChains; ++k) {
      const Tile d = LoadTile(v + i + k * kTile) - centre;
      acc[k] += squares ? d * d : d;
    }
  float total = 0.f;
  for (int k = 0; k < kChains; ++k)
    for (int j = 0; j < kTile; ++j) total += acc[k][j];
  for (; i < n; ++i) total += squares ? (v[i] - centre) * (v[i] - centre) : v[i] - centre;
  return total;
}

// out (C, Lp) = weight (C_in, U)^T in (C_in, Lp), plus bias (U) where given: pixels in tiles of kTile, kChains
// outputs summed at once. weight is read as weight[c * ldw + u].
void TiledProduct(const float* __restrict in, int C_in, const float* __restrict weight, int ldw, int U,
                  const float* __restrict bias, float* __restrict out, int Lp) {
  for (int i0 = 0; i0 < Lp; i0 += kTile)
    for (int u0 = 0; u0 < U; u0 += kChains) {
      const int count = std::min(kChains, U - u0);
      Tile acc[kChains];
      for (int k = 0; k < kChains; ++k) acc[k] = Tile{} + (bias != nullptr && k < count ? bias[u0 + k] : 0.f);
      for (int c = 0; c < C_in; ++c) {
        const Tile tile = LoadTile(in + c * Lp + i0);
        const float* __restrict wc = weight + c * ldw + u0;
        if (count == kChains)
          for (int k = 0; k < kChains; ++k) acc[k] += wc[k] * tile;
        else
          for (int k = 0; k < count; ++k) acc[k] += wc[k] * tile;
      }
      for (int k = 0; k < count; ++k) std::memcpy(out + (u0 + k) * Lp + i0, &acc[k], sizeof(Tile));
    }
}

// One layer over raw arrays (shapes in the file's header). Every loop runs over pixels or patches innermost.
void FoldedMoELayer(const LayerAttributes& a, const float* __restrict x, float* __restrict y,
                    const float* __restrict w1, const float* __restrict b1, const float* __restrict keys,
                    const float* __restrict w2, int B, int C, int P, int N, int R, int E_all) {
  const int H = a.hidden, E = a.held, EH = E * H, U1 = EH + R, L = P * N, CL = C * L;
  const auto padded = [](int n) { return (n + kTile - 1) / kTile * kTile; };  // whole tiles
  const int Lp = padded(L), Np = padded(N);
  const int routes = a.image_routing ? 1 : N, Rp = padded(routes);  // routing decisions per image
  // Kept per thread across calls: allocating the first layer's (1 MB) on every call costs page faults.
  thread_local std::vector<float> scratch;
  scratch.resize(C * Lp + C * Rp + R * Rp + EH * Lp + C * Lp + E * Np + C * Np + E_all * Rp + 5 * routes + N);
  float* __restrict t = scratch.data();       // (C, Lp): normalised tokens, zero past L
  float* __restrict embedding = t + C * Lp;    // (C, Rp): their mean per route
  float* __restrict query = embedding + C * Rp;  // (R, Rp)
  float* __restrict act = query + R * Rp;      // (E * H, Lp): the experts' units
  float* __restrict second = act + EH * Lp;    // (C, Lp)
  float* __restrict gates = second + C * Lp;   // (E, Np): each patch's gate on its expert, zero on the others
  float* __restrict shifts = gates + E * Np;   // (C, Np): each patch's expert's output shift times its gate
  float* __restrict prob = shifts + C * Np;    // (E_all, Rp): exp(logit - top)
  float* __restrict norm = prob + E_all * Rp;
  float* __restrict total = norm + routes;
  float* __restrict best_p = total + routes;
  float* __restrict absent_p = best_p + routes;
  float* __restrict top = absent_p + routes;
  float* __restrict gate = top + routes;       // (N)
  thread_local std::vector<int> choice, best;
  thread_local std::vector<unsigned char> removed;
  choice.resize(N), best.resize(routes), removed.resize(N);

  for (int b = 0; b < B; ++b) {
    const float* __restrict xb = x + static_cast<int64_t>(b) * CL;
    float* __restrict yb = y + static_cast<int64_t>(b) * CL;
    // GroupNorm, one group, no affine: the mean, then the variance of the centred values, as torch; and the
    // tokens' mean per patch (or image), which is all the router reads.
    const float mean = Sum(xb, CL, 0.f, false) / CL;
    const float rstd = 1.f / std::sqrt(Sum(xb, CL, mean, true) / CL + a.eps);
    for (int i = 0; i < C * Rp; ++i) embedding[i] = 0.f;
    for (int c = 0; c < C; ++c) {
      float* __restrict tc = t + c * Lp;
      float* __restrict ec = embedding + c * Rp;
      const float* __restrict xc = xb + c * L;
      for (int p = 0; p < P; ++p)
        for (int n = 0; n < N; ++n) {
          const float v = (xc[p * N + n] - mean) * rstd;
          tc[p * N + n] = v;
          ec[a.image_routing ? 0 : n] += v;
        }
      for (int i = L; i < Lp; ++i) tc[i] = 0.f;
      for (int n = 0; n < routes; ++n) ec[n] /= a.image_routing ? L : P;
    }
    // The router's query (its projection's columns of weight1), unit length; exp(logit - top) of every expert;
    // the best held and the best absent one.
    TiledProduct(embedding, C, w1 + EH, U1, R, b1 + EH, query, Rp);
    for (int n = 0; n < routes; ++n) norm[n] = 0.f;
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < routes; ++n) norm[n] += query[r * Rp + n] * query[r * Rp + n];
    TiledProduct(query, R, keys, E_all, E_all, nullptr, prob, Rp);  // logits, before the query's length is out
    for (int n = 0; n < routes; ++n) norm[n] = 1.f / std::max(std::sqrt(norm[n]), 1e-12f);
    for (int n = 0; n < routes; ++n) top[n] = prob[n];
    for (int e = 1; e < E_all; ++e)
      for (int n = 0; n < routes; ++n) top[n] = std::max(top[n], prob[e * Rp + n]);
    for (int n = 0; n < routes; ++n) total[n] = 0.f;
    for (int e = 0; e < E_all; ++e)
      for (int n = 0; n < routes; ++n) {
        prob[e * Rp + n] = Exp((prob[e * Rp + n] - top[n]) * norm[n]);
        total[n] += prob[e * Rp + n];
      }
    // Compared on exp(logit - top): dividing by the total, done for the winner only, keeps their order (values
    // equal after rounding aside, where softmax ties and takes the first).
    for (int n = 0; n < routes; ++n) best_p[n] = prob[n], best[n] = 0, absent_p[n] = 0.f;
    for (int e = 1; e < E; ++e)
      for (int n = 0; n < routes; ++n)
        if (prob[e * Rp + n] > best_p[n]) best_p[n] = prob[e * Rp + n], best[n] = e;
    for (int e = E; e < E_all; ++e)
      for (int n = 0; n < routes; ++n) absent_p[n] = std::max(absent_p[n], prob[e * Rp + n]);
    for (int n = 0; n < N; ++n) {
      const int route = a.image_routing ? 0 : n;
      choice[n] = best[route], gate[n] = best_p[route] / total[route];
      removed[n] = a.remove_absent && absent_p[route] > best_p[route];
    }

    // The experts as a masked dense layer: every held expert's units on every pixel, SiLU, times the patch's
    // gate on its own expert's units and zero on the others. (Gathering each patch's own expert would do 1/E of
    // the multiply-adds, but gathers are the slowest loads, and E * H units are few.)
    TiledProduct(t, C, w1, U1, EH, b1, act, Lp);
    for (int u = 0; u < EH; ++u) {
      float* __restrict au = act + u * Lp;
      for (int p = 0; p < P; ++p)
        for (int n = 0; n < N; ++n) {
          const float h = au[p * N + n];
          au[p * N + n] = (choice[n] == u / H ? gate[n] : 0.f) * h / (1.f + Exp(-h));
        }
      for (int i = L; i < Lp; ++i) au[i] = 0.f;
    }
    TiledProduct(act, EH, w2, C, C, nullptr, second, Lp);
    // Each patch's expert's output shift (weight2's last E rows), times its gate: once per patch, not per pixel.
    for (int e = 0; e < E; ++e)
      for (int n = 0; n < Np; ++n) gates[e * Np + n] = n < N && choice[n] == e ? gate[n] : 0.f;
    TiledProduct(gates, E, w2 + EH * C, C, C, nullptr, shifts, Np);
    for (int c = 0; c < C; ++c) {
      float* __restrict yc = yb + c * L;
      const float *__restrict sc = second + c * Lp, *__restrict shift = shifts + c * Np;
      for (int p = 0; p < P; ++p)
        for (int n = 0; n < N; ++n) yc[p * N + n] = sc[p * N + n] + shift[n];
      if (a.remove_absent)  // MLP_e(x) <- -x: the residual zeroes a patch whose best expert is absent
        for (int p = 0; p < P; ++p)
          for (int n = 0; n < N; ++n)
            if (removed[n]) yc[p * N + n] = -xb[c * L + p * N + n];
    }
  }
}

struct FoldedMoEKernel {
  LayerAttributes attributes;

  FoldedMoEKernel(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info{info};
    attributes.held = static_cast<int>(kernel_info.GetAttribute<int64_t>("num_held"));
    attributes.hidden = static_cast<int>(kernel_info.GetAttribute<int64_t>("hidden"));
    attributes.eps = kernel_info.GetAttribute<float>("eps");
    attributes.image_routing = kernel_info.GetAttribute<int64_t>("image_routing") != 0;
    attributes.remove_absent = kernel_info.GetAttribute<int64_t>("remove_absent") != 0;
  }

  // The output has x's shape: said to ONNX Runtime's shape inference, so the graph after each layer keeps the
  // static shapes its planner and rewrites use.
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& context) {
    return context.SetOutputShape(0, context.GetInputShape(0));
  }

  Ort::Status Compute(const Tensor<float>& x, const Tensor<float>& weight1, const Tensor<float>& bias1,
                      const Tensor<float>& keys, const Tensor<float>& weight2, Tensor<float>& out) {
    const std::vector<int64_t> shape = x.Shape(), w1 = weight1.Shape(), k = keys.Shape(), w2 = weight2.Shape();
    const int64_t EH = attributes.held * attributes.hidden;
    if (shape.size() != 4 || w1.size() != 2 || k.size() != 2 || w2.size() != 2)
      return Ort::Status("FoldedMoE: x must be (B, C, P, N) and the weights matrices", ORT_INVALID_ARGUMENT);
    const int64_t C = shape[1], R = w1[1] - EH;
    if (w1[0] != C || R < 1 || bias1.Shape() != std::vector<int64_t>{EH + R} || k[0] != R ||
        k[1] < attributes.held || w2[0] != EH + attributes.held || w2[1] != C)
      return Ort::Status("FoldedMoE: weights do not match x and the attributes", ORT_INVALID_ARGUMENT);
    FoldedMoELayer(attributes, x.Data(), out.Allocate(shape), weight1.Data(), bias1.Data(), keys.Data(),
                   weight2.Data(), static_cast<int>(shape[0]), static_cast<int>(C), static_cast<int>(shape[2]),
                   static_cast<int>(shape[3]), static_cast<int>(R), static_cast<int>(k[1]));
    return Ort::Status{nullptr};
  }
};

}  // namespace

// The one exported symbol (built with -fvisibility=hidden): ONNX Runtime calls it when a session registers the
// library. No exception may cross into ONNX Runtime: one becomes the status it returns.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    static Ort::CustomOpDomain domain{"ai.geomoe"};
    static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
        Ort::Custom::CreateLiteCustomOp<FoldedMoEKernel>("FoldedMoE", "CPUExecutionProvider")};
    static const bool added = (domain.Add(op.get()), true);
    (void)added;
    Ort::UnownedSessionOptions{options}.Add(domain);
  } catch (const Ort::Exception& error) {
    return Ort::Status{error}.release();
  } catch (const std::exception& error) {
    return Ort::Status{error.what(), ORT_FAIL}.release();
  }
  return nullptr;
}
