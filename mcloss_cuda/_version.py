# The one place the version is defined: setup.py reads this file as text (it cannot import the
# package, which needs torch and the built extension), mcloss_cuda/__init__.py imports it.
__version__ = "0.1.0"
