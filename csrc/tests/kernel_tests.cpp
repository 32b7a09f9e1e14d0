// Unit tests of the raw-pointer kernel math (ops/*_common.h) against naive loops; no torch, so
// they build in seconds. Run by ctest (CMakeLists.txt, scripts/native_check.sh).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "ops/head_common.h"
#include "ops/per_sample_grad_common.h"

namespace fi = fastinfluence;

namespace {

int failures = 0;

void expect_close(double got, double want, const char* what, double tol = 1e-10) {
  if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) {
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
    ++failures;
  }
}

std::vector<double> random_vector(size_t size, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> values(size);
  for (double& value : values) {
    value = normal(rng);
  }
  return values;
}

std::vector<double> softmax_rows(const std::vector<double>& logits, int64_t n, int64_t C) {
  std::vector<double> P(logits.size());
  for (int64_t i = 0; i < n; ++i) {
    double total = 0;
    for (int64_t c = 0; c < C; ++c) {
      total += P[i * C + c] = std::exp(logits[i * C + c]);
    }
    for (int64_t c = 0; c < C; ++c) {
      P[i * C + c] /= total;
    }
  }
  return P;
}

void test_dot_helpers(std::mt19937_64& rng) {
  for (int64_t len : {0, 1, 15, 16, 33, 100}) {
    const auto w = random_vector(len, rng), y0 = random_vector(len, rng);
    std::vector<std::vector<double>> rows;
    for (int b = 0; b < fi::kRowBlock; ++b) {
      rows.push_back(random_vector(len, rng));
    }
    const double* x[fi::kRowBlock] = {rows[0].data(), rows[1].data(), rows[2].data(),
                                      rows[3].data()};
    double dots[fi::kRowBlock];
    fi::dot_rows(w.data(), x, len, dots);
    const double alpha[fi::kRowBlock] = {0.5, -1, 2, 3};
    auto y = y0;
    fi::axpy_rows(alpha, x, y.data(), len);
    for (int b = 0; b < fi::kRowBlock; ++b) {
      double want = 0;
      for (int64_t j = 0; j < len; ++j) {
        want += w[j] * rows[b][j];
      }
      expect_close(dots[b], want, "dot_rows");
      expect_close(fi::dot(w.data(), x[b], len), want, "dot");
    }
    for (int64_t j = 0; j < len; ++j) {
      double want = y0[j];
      for (int b = 0; b < fi::kRowBlock; ++b) {
        want += alpha[b] * rows[b][j];
      }
      expect_close(y[j], want, "axpy_rows");
    }
  }
}

void test_head_hvp_and_scores(std::mt19937_64& rng) {
  // k = 3 directions, read as k·C stacked rows.
  const int64_t n = 11, d = 19, C = 3, k = 3, kC = k * C;
  const auto A = random_vector(n * d, rng), Vw = random_vector(kC * d, rng);
  const auto Vb = random_vector(kC, rng), P = softmax_rows(random_vector(n * C, rng), n, C);
  std::vector<double> acc_w(kC * d, 0), acc_b(kC, 0), u(fi::kRowBlock * kC), scores(n * k);
  fi::head_hvp_rows(A.data(), d, P.data(), C, Vw.data(), Vb.data(), nullptr, 0, n, k, C, d,
                    u.data(), acc_w.data(), acc_b.data());
  std::vector<int64_t> y(n);
  for (int64_t i = 0; i < n; ++i) {
    y[i] = i % C;
  }
  const int64_t bad = fi::head_scores_rows(A.data(), d, P.data(), C, y.data(), Vw.data(),
                                           Vb.data(), 0, n, k, C, d, u.data(), scores.data());
  if (bad != 0) {
    std::printf("FAIL head_scores_rows: %lld bad labels reported\n", static_cast<long long>(bad));
    ++failures;
  }
  std::vector<double> want_w(kC * d, 0), want_b(kC, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      double U[C], pu = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t q = j * C + c;
        U[c] = Vb[q];
        for (int64_t e = 0; e < d; ++e) {
          U[c] += Vw[q * d + e] * A[i * d + e];
        }
        pu += P[i * C + c] * U[c];
      }
      double score = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t q = j * C + c;
        const double r = P[i * C + c] * U[c] - P[i * C + c] * pu;
        for (int64_t e = 0; e < d; ++e) {
          want_w[q * d + e] += r * A[i * d + e];
        }
        want_b[q] += r;
        score -= (P[i * C + c] - (c == y[i] ? 1.0 : 0.0)) * U[c];
      }
      expect_close(scores[i * k + j], score, "head_scores_rows");
    }
  }
  for (int64_t e = 0; e < kC * d; ++e) {
    expect_close(acc_w[e], want_w[e], "head_hvp_rows weight");
  }
  for (int64_t q = 0; q < kC; ++q) {
    expect_close(acc_b[q], want_b[q], "head_hvp_rows bias");
  }
  // Index lists: the same rows listed explicitly give the same sums.
  std::vector<int64_t> rows(n);
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = n - 1 - i;
  }
  std::vector<double> listed_w(kC * d, 0);
  fi::head_hvp_rows(A.data(), d, P.data(), C, Vw.data(), Vb.data(), rows.data(), 0, n, k, C, d,
                    u.data(), listed_w.data(), static_cast<double*>(nullptr));
  for (int64_t e = 0; e < kC * d; ++e) {
    expect_close(listed_w[e], want_w[e], "head_hvp_rows with row list");
  }
  y[2] = C;
  if (fi::head_scores_rows(A.data(), d, P.data(), C, y.data(), Vw.data(), Vb.data(), 0, n, k, C,
                           d, u.data(), scores.data()) != 1) {
    std::printf("FAIL head_scores_rows: an out-of-range label must be counted once\n");
    ++failures;
  }
  for (int64_t j = 0; j < k; ++j) {
    if (!std::isnan(scores[2 * k + j])) {
      std::printf("FAIL head_scores_rows: an out-of-range label must give NaN scores\n");
      ++failures;
    }
  }
}

void test_lissa_rows() {
  std::vector<int64_t> counts(7, 0);
  for (int64_t k = 0; k < 7000; ++k) {
    const int64_t row = fi::lissa_row(42, 3, 7000, k, 7);
    if (row < 0 || row >= 7 || row != fi::lissa_row(42, 3, 7000, k, 7)) {
      std::printf("FAIL lissa_row: %lld out of range or not deterministic\n",
                  static_cast<long long>(row));
      ++failures;
      return;
    }
    ++counts[row];
  }
  for (int64_t count : counts) {
    expect_close(static_cast<double>(count), 1000.0, "lissa_row uniformity", 0.15);
  }
  // The Python twin draws the same rows: twins.lissa_batch_indices(5, 1, 4, 1000).
  const int64_t python_rows[4] = {461, 436, 609, 515};
  for (int64_t k = 0; k < 4; ++k) {
    expect_close(static_cast<double>(fi::lissa_row(5, 1, 4, k, 1000)),
                 static_cast<double>(python_rows[k]), "lissa_row vs Python twin", 0);
  }
  expect_close(fi::lissa_step(1.0, 2.0, 3.0, 0.5, 0.25), 1.0 + 1.0 - 0.75, "lissa_step");
}

void test_per_sample_grads(std::mt19937_64& rng) {
  const int64_t S = 3, in = 5, out = 4, K = 6, L = 7, C_out = 2;
  const auto x = random_vector(S * in, rng), g = random_vector(S * out, rng);
  const auto v = random_vector(out * in, rng);
  std::vector<double> G(out * in);
  fi::linear_grad_sample(x.data(), g.data(), S, in, out, G.data());
  double dot = 0;
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      double want = 0;
      for (int64_t s = 0; s < S; ++s) {
        want += g[s * out + o] * x[s * in + i];
      }
      expect_close(G[o * in + i], want, "linear_grad_sample");
      dot += v[o * in + i] * want;
    }
  }
  expect_close(fi::linear_grad_dot_sample(x.data(), g.data(), v.data(), S, in, out), dot,
               "linear_grad_dot_sample");
  const auto xu = random_vector(K * L, rng), gc = random_vector(C_out * L, rng);
  const auto vc = random_vector(C_out * K, rng);
  std::vector<double> Gc(C_out * K);
  fi::conv2d_grad_sample(xu.data(), gc.data(), K, L, C_out, Gc.data());
  dot = 0;
  for (int64_t c = 0; c < C_out; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      double want = 0;
      for (int64_t l = 0; l < L; ++l) {
        want += gc[c * L + l] * xu[k * L + l];
      }
      expect_close(Gc[c * K + k], want, "conv2d_grad_sample");
      dot += vc[c * K + k] * want;
    }
  }
  expect_close(fi::conv2d_grad_dot_sample(xu.data(), gc.data(), vc.data(), K, L, C_out), dot,
               "conv2d_grad_dot_sample");
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  test_dot_helpers(rng);
  test_head_hvp_and_scores(rng);
  test_lissa_rows();
  test_per_sample_grads(rng);
  std::printf("%s (%d failures)\n", failures == 0 ? "OK" : "FAILED", failures);
  return failures == 0 ? 0 : 1;
}
