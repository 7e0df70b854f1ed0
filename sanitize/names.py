"""The registries' names, readable without importing torch, so that `--help` lists them and a typo is caught before
any heavy import. tests/sanitize/test_names.py checks each against its registry."""

MODELS = ("convnet", "convnet_nobn", "resnet18", "resnet18_cifar", "resnet18_cifar_w16", "tiny")
ATTACKS = ("bullseye-polytope", "gradient-matching", "metapoison", "poison-frogs")
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")  # and cuda:N
