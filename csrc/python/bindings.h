// What each binding translation unit adds to the phi3fast._hnsw module; module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

void bind_errors(pybind11::module_& m);   // HnswError & co., SPACES, STORAGES (module.cpp)
void bind_index(pybind11::module_& m);    // Index (index.cpp)
void bind_bfindex(pybind11::module_& m);  // BFIndex (bfindex.cpp)
void bind_nf4(pybind11::module_& m);      // NF4View, nf4_linear, nf4_dx: the NF4 CPU kernels (nf4.cpp)
void bind_decode(pybind11::module_& m);   // NativeDecoder: one whole decode step (decode.cpp)
