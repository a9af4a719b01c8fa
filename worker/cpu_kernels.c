/* meshpipe's CPU kernels (AVX-512): products with GGUF Q4_1 / Q8_0 blocks, decode attention and
 * RMS norm.
 *
 * Built by worker/cpu_kernels.py with the system C compiler and called through ctypes with
 * tensor pointers. The products dequantize each block once into L1 for up to 8 rows of a call,
 * then multiply in a register-blocked outer product (as BLAS kernels do): one fused
 * multiply-add per row and 16 outputs, so a row costs a fraction of a one-row call. Every row's
 * arithmetic is the same sequence of operations whatever the rows beside it: a sequence's
 * result never depends on the batch it is in.
 *
 * Weight layout (see tiled() in worker/blocks.py), per tile of 16 outputs and block of 32 inputs:
 *   Q4_1  qs[tile][block][16][16] uint8: byte j of output i holds inputs j (low) and j + 16 (high)
 *         d, m [tile][block][16] fp16:    w = d * q + m (exact in float32)
 *   Q8_0  qs[tile][block][32][16] int8, d [tile][block][16] fp16: w = d * q
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define BLOCK 32
#define MAX_TILES 8      /* tiles of 16 outputs in one panel */
#define MAX_PANEL_ROWS 8 /* rows of x in one pass over the weights */

/* A block of 32 inputs of `tiles` consecutive tiles, dequantized into w[j][t] (16 outputs each),
 * where tile t's block is at index t * blocks of the tile-major arrays. */
static inline __attribute__((always_inline)) void q4_1_dequantize(
    const int tiles, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t blocks,
    __m512 w[BLOCK][MAX_TILES]) {
  const __m512i fifteen = _mm512_set1_epi32(15);
  for (int t = 0; t < tiles; t++) {
    const int64_t at = t * blocks;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + at * LANES)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + at * LANES)));
    const uint8_t *q = qs + at * (BLOCK / 2) * LANES;
    for (int j = 0; j < BLOCK / 2; j++) { /* byte j: inputs j (low nibble) and j + 16 (high) */
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + j * LANES)));
      w[j][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, fifteen)), dv, mv);
      w[j + 16][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), dv, mv);
    }
  }
}

static inline __attribute__((always_inline)) void q8_0_dequantize(
    const int tiles, const int8_t *qs, const uint16_t *d, int64_t blocks,
    __m512 w[BLOCK][MAX_TILES]) {
  for (int t = 0; t < tiles; t++) {
    const int64_t at = t * blocks;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + at * LANES)));
    const int8_t *q = qs + at * BLOCK * LANES;
    for (int j = 0; j < BLOCK; j++) {
      const __m128i bytes = _mm_loadu_si128((const __m128i *)(q + j * LANES));
      w[j][t] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), dv);
    }
  }
}

/* rows R of x [R, K] times a panel of `tiles` tiles of 16 outputs, into y (row stride n): each
 * block is dequantized once into L1, then an outer product with the accumulators in registers
 * (R x tiles of them), so that a weight vector loaded serves R rows and an input broadcast
 * serves `tiles` tiles. Each output sums its 32-input blocks in order, one accumulator each. */
#define PANEL(KIND, DEQUANTIZE)                                                                 \
  static inline __attribute__((always_inline)) void KIND##_panel(                              \
      const int R, const int tiles, const float *x, int64_t k, KIND##_WEIGHTS, float *y,      \
      int64_t n) {                                                                              \
    const int64_t blocks = k / BLOCK;                                                           \
    __m512 acc[MAX_PANEL_ROWS][MAX_TILES];                                                      \
    __m512 w[BLOCK][MAX_TILES] __attribute__((aligned(64)));                                    \
    for (int r = 0; r < R; r++)                                                                 \
      for (int t = 0; t < tiles; t++) acc[r][t] = _mm512_setzero_ps();                          \
    for (int64_t b = 0; b < blocks; b++) {                                                      \
      DEQUANTIZE;                                                                               \
      const float *xb = x + b * BLOCK;                                                          \
      for (int j = 0; j < BLOCK; j++) {                                                         \
        __m512 wv[MAX_TILES];                                                                   \
        for (int t = 0; t < tiles; t++) wv[t] = w[j][t];                                        \
        for (int r = 0; r < R; r++) {                                                           \
          const __m512 xv = _mm512_set1_ps(xb[r * k + j]);                                      \
          for (int t = 0; t < tiles; t++) acc[r][t] = _mm512_fmadd_ps(xv, wv[t], acc[r][t]);   \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    for (int r = 0; r < R; r++)                                                                 \
      for (int t = 0; t < tiles; t++) _mm512_storeu_ps(y + r * n + t * LANES, acc[r][t]);      \
  }

#define q4_1_WEIGHTS const uint8_t *qs, const uint16_t *d, const uint16_t *m
#define q8_0_WEIGHTS const int8_t *qs, const uint16_t *d
PANEL(q4_1, q4_1_dequantize(tiles, qs + b * 256, d + b * LANES, m + b * LANES, blocks, w))
PANEL(q8_0, q8_0_dequantize(tiles, qs + b * 512, d + b * LANES, blocks, w))

/* Rows a pass and tiles a panel, constants in each case so the accumulators live in registers
 * (at most 24 of the 32 vector registers): few rows take wide panels, many rows narrow ones. */
#define ROW_CASES(CALL)                                                                         \
  switch (R) {                                                                                  \
  case 1: CALL(1, 8); break;                                                                    \
  case 2: CALL(2, 8); break;                                                                    \
  case 3: CALL(3, 6); break;                                                                    \
  case 4: CALL(4, 5); break;                                                                    \
  case 5: CALL(5, 4); break;                                                                    \
  case 6: CALL(6, 4); break;                                                                    \
  case 7: CALL(7, 3); break;                                                                    \
  default: CALL(8, 3); break;                                                                   \
  }

/* The panels of one pass over up to MAX_PANEL_ROWS rows, and the remainder tiles one by one. */
#define PASS(KIND, ARGS_AT, ROWS, TILES)                                                                   \
  for (; t + TILES <= tiles; t += TILES) KIND##_panel(ROWS, TILES, xr, k, ARGS_AT(t), yr + t * LANES, n); \
  for (; t < tiles; t++) KIND##_panel(ROWS, 1, xr, k, ARGS_AT(t), yr + t * LANES, n);

#define Q4_AT(t) qs + (t) * blocks * 256, d + (t) * blocks * LANES, m + (t) * blocks * LANES
#define Q8_AT(t) qs + (t) * blocks * 512, d + (t) * blocks * LANES

/* y [rows, n] = x [rows, k] times the blocks: passes of up to MAX_PANEL_ROWS rows. */
#define MATMUL(KIND, CALL)                                                                      \
  void KIND##_matmul(const float *x, int64_t rows, int64_t k, KIND##_WEIGHTS, int64_t n,      \
                     float *y) {                                                                \
    const int64_t tiles = n / LANES, blocks = k / BLOCK;                                        \
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_PANEL_ROWS) {                                     \
      const int R = rows - r0 < MAX_PANEL_ROWS ? (int)(rows - r0) : MAX_PANEL_ROWS;             \
      const float *xr = x + r0 * k;                                                             \
      float *yr = y + r0 * n;                                                                   \
      int64_t t = 0;                                                                            \
      ROW_CASES(CALL)                                                                           \
    }                                                                                           \
  }

#define Q4_PASS(ROWS, TILES) PASS(q4_1, Q4_AT, ROWS, TILES)
#define Q8_PASS(ROWS, TILES) PASS(q8_0, Q8_AT, ROWS, TILES)
MATMUL(q4_1, Q4_PASS)
MATMUL(q8_0, Q8_PASS)

/* Rotates x [dim] by one position's cos/sin [dim] (the half-split layout of Hugging Face's Llama:
 * x * cos + cat(-x[dim/2:], x[:dim/2]) * sin) into out. */
static void rotate(const float *x, const float *cos, const float *sin, int64_t dim, float *out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i++) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

/* Lane u of the result: the sum of the lanes of x[u], for 16 vectors (a transpose-and-add tree). */
static inline __m512 sum_lanes16(const __m512 *x) {
  __m512 pairs[8], quads[4];
  for (int k = 0; k < 8; k++) /* within 128 bits: [a0+a2, b0+b2, a1+a3, b1+b3] */
    pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * k], x[2 * k + 1]),
                             _mm512_unpackhi_ps(x[2 * k], x[2 * k + 1]));
  for (int k = 0; k < 4; k++) { /* within 128 bits: the 4 vectors' sums over those 128 bits */
    const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
    quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  /* 128-bit block k of the result: quads[k] summed over its four blocks */
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

/* scores[t] = scale * q . keys[t] for t < length; q and each key hold `dim` floats (dim % 16 == 0). */
static inline __attribute__((always_inline)) void attention_scores(const float *q, const float *keys, int64_t length, int64_t dim,
                             float scale, float *scores) {
  int64_t t = 0;
  for (; t + LANES <= length; t += LANES) {
    __m512 dots[LANES];
    for (int u = 0; u < LANES; u++) dots[u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += LANES) {
      const __m512 qv = _mm512_loadu_ps(q + i);
      for (int u = 0; u < LANES; u++)
        dots[u] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys + (t + u) * dim + i), dots[u]);
    }
    _mm512_storeu_ps(scores + t, _mm512_mul_ps(sum_lanes16(dots), _mm512_set1_ps(scale)));
  }
  for (; t < length; t++) {
    __m512 dot = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += LANES)
      dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(keys + t * dim + i), dot);
    scores[t] = _mm512_reduce_add_ps(dot) * scale;
  }
}

/* e^x for x <= 0 (softmax's shifted scores): e^x = 2^k e^r, k = round(x / ln 2), |r| <= ln 2 / 2,
 * e^r by its degree-7 Taylor-like minimax polynomial (Cephes' expf coefficients, relative error
 * about 1e-7); below -87 the result is 0, as float32's e^x is. */
static inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x); /* ln 2 in two parts */
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

/* out = softmax(scores) . values over `length` rows of `dim` floats (dim % 16 == 0, <= 256). */
static inline __attribute__((always_inline)) void attention_values(float *scores, const float *values, int64_t length, int64_t dim,
                             float *out) {
  float top = -INFINITY;
  for (int64_t t = 0; t < length; t++) top = scores[t] > top ? scores[t] : top;
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; t += LANES) {
    const __mmask16 valid = length - t >= LANES ? 0xFFFF : (__mmask16)((1u << (length - t)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + t), shift));
    _mm512_mask_storeu_ps(scores + t, valid, e);
    sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(valid, e));
  }
  const float total = _mm512_reduce_add_ps(sums);
  __m512 acc[16];
  const int64_t chunks = dim / LANES;
  for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; t++) {
    const __m512 p = _mm512_set1_ps(scores[t]);
    for (int64_t c = 0; c < chunks; c++)
      acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(values + t * dim + c * LANES), acc[c]);
  }
  const __m512 norm = _mm512_set1_ps(1.0f / total);
  for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(out + c * LANES, _mm512_mul_ps(acc[c], norm));
}

/* The attention of a decode step, for `batch` sequences that each add one token: from the fused
 * projection qkv [batch, (heads + 2 kv_heads) * dim], rotate q and k by cos/sin [batch, dim],
 * write k and v at (slots[b], positions[b]) of the caches [slots, kv_heads, capacity, dim], and
 * attend over the slot's positions[b] + 1 keys, read in place; out [batch, heads * dim].
 * dim is a multiple of 16 up to 256; `scratch` holds at least capacity + dim floats. */
static inline __attribute__((always_inline)) void decode_attention_dim(
    const float *qkv, const float *cos, const float *sin, const int64_t *slots,
    const int64_t *positions, float *k_cache, float *v_cache, float *out, int64_t batch,
    int64_t heads, int64_t kv_heads, int64_t capacity, const int64_t dim, float *scratch) {
  const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim;
  const float scale = 1.0f / sqrtf((float)dim);
  float *scores = scratch, *query = scratch + capacity;
  for (int64_t b = 0; b < batch; b++) {
    const float *row = qkv + b * width, *c = cos + b * dim, *s = sin + b * dim;
    const int64_t position = positions[b];
    for (int64_t g = 0; g < kv_heads; g++) {
      const int64_t at = (slots[b] * kv_heads + g) * capacity * dim + position * dim;
      rotate(row + (heads + g) * dim, c, s, dim, k_cache + at);
      memcpy(v_cache + at, row + (heads + kv_heads + g) * dim, dim * sizeof(float));
    }
    for (int64_t h = 0; h < heads; h++) {
      const int64_t at = (slots[b] * kv_heads + h / group) * capacity * dim;
      rotate(row + h * dim, c, s, dim, query);
      attention_scores(query, k_cache + at, position + 1, dim, scale, scores);
      attention_values(scores, v_cache + at, position + 1, dim, out + (b * heads + h) * dim);
    }
  }
}

void decode_attention(const float *qkv, const float *cos, const float *sin, const int64_t *slots,
                      const int64_t *positions, float *k_cache, float *v_cache, float *out,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t capacity,
                      int64_t dim, float *scratch) {
#define DIM(D) \
  decode_attention_dim(qkv, cos, sin, slots, positions, k_cache, v_cache, out, batch, heads, \
                       kv_heads, capacity, D, scratch)
  switch (dim) { /* the common head sizes as constants: the loops over a head unrolled */
  case 64: DIM(64); break;
  case 128: DIM(128); break;
  default: DIM(dim); break;
  }
#undef DIM
}

/* RMS norm of `rows` rows of `dim` floats: out = x / sqrt(mean(x^2) + eps) * weight. */
void rms_norm(const float *x, const float *weight, int64_t rows, int64_t dim, float eps,
              float *out) {
  for (int64_t r = 0; r < rows; r++) {
    const float *row = x + r * dim;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < dim; i++) squares += row[i] * row[i];
    const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) out[r * dim + i] = weight[i] * (row[i] * scale);
  }
}
