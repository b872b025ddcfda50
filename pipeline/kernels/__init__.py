"""C++ TensorFlow ops for the CPU train step, compiled for the machine at first use (`cell`)."""
