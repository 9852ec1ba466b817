"""TensorFlow adapter tests. Importing this package first keeps TF's C++ start-up logging down and
asks Keras for its TensorFlow backend (if no one imported Keras with another backend before)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
