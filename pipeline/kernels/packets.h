// Packet helpers shared by cell.cc and sequence.cc: float loads, stores and
// gate functions written on Eigen packets, so every element of a row takes
// the same vector code wherever its buffer starts (see below).

#ifndef CHARLSTM_KERNELS_PACKETS_H_
#define CHARLSTM_KERNELS_PACKETS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "unsupported/Eigen/CXX11/Tensor"

namespace charlstm {

// Every element goes through the same vector code. Eigen's array expressions
// compute a buffer's first elements, up to its first aligned address, with
// scalar tanh/logistic, which differ from the vector ones in the last bit:
// results would depend on where a buffer happens to start, and a resumed run
// would drift from an uninterrupted one. So the math is written on packets
// (16 floats on AVX-512, 8 on AVX, 4 on SSE/NEON); a row's last partial
// packet is padded, and loads and stores are exact copies.
using Packet = Eigen::internal::packet_traits<float>::type;
constexpr int64_t kLanes = Eigen::internal::unpacket_traits<Packet>::size;

// bfloat16 packets of the same width where Eigen has the casts (AVX, AVX-512);
// elsewhere bfloat16 is converted one value at a time (the same values).
#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_VECTORIZE_AVX)
using BfPacket = Eigen::internal::packet_traits<Eigen::bfloat16>::type;
constexpr bool kBfPackets = Eigen::internal::unpacket_traits<BfPacket>::size == kLanes;
#else
using BfPacket = Packet;
constexpr bool kBfPackets = false;
#endif

template <typename T>
Packet Load(const T* p, int64_t n) {
  using Eigen::internal::pcast;
  using Eigen::internal::ploadu;
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) return ploadu<Packet>(p);
    alignas(64) float buf[kLanes] = {};
    std::copy(p, p + n, buf);
    return ploadu<Packet>(buf);
  } else if constexpr (kBfPackets) {
    if (n == kLanes) return pcast<BfPacket, Packet>(ploadu<BfPacket>(p));
    alignas(64) T buf[kLanes] = {};
    std::copy(p, p + n, buf);
    return pcast<BfPacket, Packet>(ploadu<BfPacket>(buf));
  } else {
    alignas(64) float buf[kLanes] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(p[k]);  // exact
    return ploadu<Packet>(buf);
  }
}

template <typename T>
void Store(const Packet& v, T* p, int64_t n) {
  using Eigen::internal::pcast;
  using Eigen::internal::pstoreu;
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) return pstoreu(p, v);
    alignas(64) float buf[kLanes];
    pstoreu(buf, v);
    std::copy(buf, buf + n, p);
  } else if constexpr (kBfPackets) {
    if (n == kLanes) return pstoreu(p, pcast<Packet, BfPacket>(v));
    alignas(64) T buf[kLanes];
    pstoreu(buf, pcast<Packet, BfPacket>(v));
    std::copy(buf, buf + n, p);
  } else {
    alignas(64) float buf[kLanes];
    pstoreu(buf, v);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(buf[k]);  // to nearest even
  }
}

inline Packet Sigmoid(const Packet& x) {
  return Eigen::internal::scalar_logistic_op<float>().packetOp(x);
}
// Store for an output that is not read again soon (z, read by the backward
// pass much later): a full, aligned packet bypasses the caches, so it costs
// no read of the line first (its fetch from memory was what the forward
// waited on). Other packets store as Store does. The writer must call
// StreamFence before another thread may read the data.
inline void StoreStream(const Packet& v, float* p, int64_t n) {
#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_VECTORIZE_AVX) || defined(EIGEN_VECTORIZE_SSE)
  if (n == kLanes && reinterpret_cast<uintptr_t>(p) % sizeof(Packet) == 0) {
#if defined(EIGEN_VECTORIZE_AVX512)
    _mm512_stream_ps(p, v);
#elif defined(EIGEN_VECTORIZE_AVX)
    _mm256_stream_ps(p, v);
#else
    _mm_stream_ps(p, v);
#endif
    return;
  }
#endif
  Store(v, p, n);
}

inline void StreamFence() {
#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_VECTORIZE_AVX) || defined(EIGEN_VECTORIZE_SSE)
  _mm_sfence();
#endif
}

// A hint only: never faults, so an address past an array's end is harmless.
template <typename T>
inline void Prefetch(const T* p, bool write) {
  if (write) {
    __builtin_prefetch(p, 1, 2);
  } else {
    __builtin_prefetch(p, 0, 2);
  }
}

inline Packet Tanh(const Packet& x) { return Eigen::internal::ptanh(x); }
inline Packet Add(const Packet& a, const Packet& b) { return Eigen::internal::padd(a, b); }
inline Packet Sub(const Packet& a, const Packet& b) { return Eigen::internal::psub(a, b); }
inline Packet Mul(const Packet& a, const Packet& b) { return Eigen::internal::pmul(a, b); }
inline Packet OneMinus(const Packet& a) {
  return Eigen::internal::psub(Eigen::internal::pset1<Packet>(1.0f), a);
}

}  // namespace charlstm

#endif  // CHARLSTM_KERNELS_PACKETS_H_
