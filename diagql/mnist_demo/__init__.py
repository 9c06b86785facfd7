"""The built-in demo: LeNet-5 with batch norm on 5,000 real MNIST digits."""
