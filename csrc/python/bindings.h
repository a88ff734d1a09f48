// What each binding translation unit adds to the phi3fast._hnsw module; module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

void bind_index(pybind11::module_& m);  // Index, BFIndex (index.cpp)
