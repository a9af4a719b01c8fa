/* meshpipe's CPU kernels (AVX-512): products with GGUF Q4_1 / Q8_0 blocks, and decode attention.
 *
 * Built by worker/cpu_kernels.py with the system C compiler and called through ctypes with
 * tensor pointers. The products dequantize each block once for all the rows of a call, then
 * run one fused multiply-add per row and 16 outputs, so a row costs a fraction of a one-row
 * call. Every row's arithmetic is the same sequence of operations whatever the rows beside it:
 * a sequence's result never depends on the batch it is in.
 *
 * Weight layout (see tiled() in worker/blocks.py), per tile of 16 outputs and block of 32 inputs:
 *   Q4_1  qs[tile][block][16][16] uint8: byte j of output i holds inputs j (low) and j + 16 (high)
 *         d, m [tile][block][16] fp16:    w = d * q + m (exact in float32)
 *   Q8_0  qs[tile][block][32][16] int8, d [tile][block][16] fp16: w = d * q
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 32

/* Q4_1: rows [R, K] of x times `tiles` tiles of weights, into y [R, N] (row stride n). Two
 * accumulators a row and tile (inputs j and j + 16 of each block), summed at the end. */
static inline __attribute__((always_inline)) void q4_1_tiles(
    const int R, const int tiles, const float *x, int64_t k, const uint8_t *qs,
    const uint16_t *d, const uint16_t *m, float *y, int64_t n) {
  const int64_t blocks = k / BLOCK;
  const __m512i fifteen = _mm512_set1_epi32(15);
  __m512 low[2][12], high[2][12];
  for (int t = 0; t < tiles; t++)
    for (int r = 0; r < R; r++) low[t][r] = high[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    for (int t = 0; t < tiles; t++) {
      const int64_t at = t * blocks + b; /* this tile's block b */
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + at * LANES)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + at * LANES)));
      const uint8_t *q = qs + at * (BLOCK / 2) * LANES;
      const float *xb = x + b * BLOCK;
      for (int j = 0; j < BLOCK / 2; j++) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + j * LANES)));
        const __m512 wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, fifteen)), dv, mv);
        const __m512 wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), dv, mv);
        for (int r = 0; r < R; r++) {
          low[t][r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * k + j]), wl, low[t][r]);
          high[t][r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * k + j + 16]), wh, high[t][r]);
        }
      }
    }
  }
  for (int t = 0; t < tiles; t++)
    for (int r = 0; r < R; r++)
      _mm512_storeu_ps(y + r * n + t * LANES, _mm512_add_ps(low[t][r], high[t][r]));
}

/* Q8_0: as above; accumulators for the even and the odd inputs of a block. */
static inline __attribute__((always_inline)) void q8_0_tiles(
    const int R, const int tiles, const float *x, int64_t k, const int8_t *qs,
    const uint16_t *d, float *y, int64_t n) {
  const int64_t blocks = k / BLOCK;
  __m512 even[2][12], odd[2][12];
  for (int t = 0; t < tiles; t++)
    for (int r = 0; r < R; r++) even[t][r] = odd[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    for (int t = 0; t < tiles; t++) {
      const int64_t at = t * blocks + b;
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + at * LANES)));
      const int8_t *q = qs + at * BLOCK * LANES;
      const float *xb = x + b * BLOCK;
      for (int j = 0; j < BLOCK; j += 2) {
        const __m512 w0 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j * LANES)))), dv);
        const __m512 w1 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + (j + 1) * LANES)))), dv);
        for (int r = 0; r < R; r++) {
          even[t][r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * k + j]), w0, even[t][r]);
          odd[t][r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * k + j + 1]), w1, odd[t][r]);
        }
      }
    }
  }
  for (int t = 0; t < tiles; t++)
    for (int r = 0; r < R; r++)
      _mm512_storeu_ps(y + r * n + t * LANES, _mm512_add_ps(even[t][r], odd[t][r]));
}

/* The row counts are compile-time constants in each case, so the accumulators live in registers:
 * up to 4 rows take two tiles a pass (enough independent chains for one row), more rows one. */
#define ROW_CASES(CALL)                                                                     \
  switch (R) {                                                                              \
  case 1: CALL(1, 2); break;                                                                \
  case 2: CALL(2, 2); break;                                                                \
  case 3: CALL(3, 2); break;                                                                \
  case 4: CALL(4, 2); break;                                                                \
  case 5: CALL(5, 1); break;                                                                \
  case 6: CALL(6, 1); break;                                                                \
  case 7: CALL(7, 1); break;                                                                \
  case 8: CALL(8, 1); break;                                                                \
  case 9: CALL(9, 1); break;                                                                \
  case 10: CALL(10, 1); break;                                                              \
  case 11: CALL(11, 1); break;                                                              \
  default: CALL(12, 1); break;                                                              \
  }

#define MAX_ROWS_A_PASS 12

void q4_1_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *qs, const uint16_t *d,
                 const uint16_t *m, int64_t n, float *y) {
  const int64_t tiles = n / LANES, blocks = k / BLOCK;
  for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS_A_PASS) {
    const int R = rows - r0 < MAX_ROWS_A_PASS ? (int)(rows - r0) : MAX_ROWS_A_PASS;
    const float *xr = x + r0 * k;
    float *yr = y + r0 * n;
    int64_t t = 0;
#define Q4(ROWS, TILES)                                                                     \
  for (; t + TILES <= tiles; t += TILES)                                                    \
    q4_1_tiles(ROWS, TILES, xr, k, qs + t * blocks * 256, d + t * blocks * LANES,          \
               m + t * blocks * LANES, yr + t * LANES, n);                                  \
  for (; t < tiles; t++)                                                                    \
    q4_1_tiles(ROWS, 1, xr, k, qs + t * blocks * 256, d + t * blocks * LANES,              \
               m + t * blocks * LANES, yr + t * LANES, n);
    ROW_CASES(Q4)
#undef Q4
  }
}

void q8_0_matmul(const float *x, int64_t rows, int64_t k, const int8_t *qs, const uint16_t *d,
                 int64_t n, float *y) {
  const int64_t tiles = n / LANES, blocks = k / BLOCK;
  for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS_A_PASS) {
    const int R = rows - r0 < MAX_ROWS_A_PASS ? (int)(rows - r0) : MAX_ROWS_A_PASS;
    const float *xr = x + r0 * k;
    float *yr = y + r0 * n;
    int64_t t = 0;
#define Q8(ROWS, TILES)                                                                     \
  for (; t + TILES <= tiles; t += TILES)                                                    \
    q8_0_tiles(ROWS, TILES, xr, k, qs + t * blocks * 512, d + t * blocks * LANES,          \
               yr + t * LANES, n);                                                          \
  for (; t < tiles; t++)                                                                    \
    q8_0_tiles(ROWS, 1, xr, k, qs + t * blocks * 512, d + t * blocks * LANES, yr + t * LANES, n);
    ROW_CASES(Q8)
#undef Q8
  }
}

/* One new token of each of `batch` sequences attends to its slot's cached keys and values, read
 * in place: q, out [batch, heads, dim]; caches [slots, kv_heads, capacity, dim]; lengths[b] keys
 * of slot slots[b] are attended. `scores` is scratch of at least max(lengths) floats. */
void decode_attention(const float *q, const float *k_cache, const float *v_cache,
                      const int64_t *slots, const int64_t *lengths, float *out, int64_t batch,
                      int64_t heads, int64_t kv_heads, int64_t capacity, int64_t dim,
                      float *scores) {
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / sqrtf((float)dim);
  for (int64_t b = 0; b < batch; b++) {
    const int64_t length = lengths[b];
    for (int64_t h = 0; h < heads; h++) {
      const int64_t at = (slots[b] * kv_heads + h / group) * capacity * dim;
      const float *keys = k_cache + at, *values = v_cache + at;
      const float *query = q + (b * heads + h) * dim;
      float *o = out + (b * heads + h) * dim;
      float top = -INFINITY;
      for (int64_t t = 0; t < length; t++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dim; i++) s += query[i] * keys[t * dim + i];
        scores[t] = s * scale;
        top = scores[t] > top ? scores[t] : top;
      }
      float total = 0.0f;
      for (int64_t t = 0; t < length; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
      }
#pragma omp simd
      for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
      for (int64_t t = 0; t < length; t++) {
        const float p = scores[t] / total;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] += p * values[t * dim + i];
      }
    }
  }
}
