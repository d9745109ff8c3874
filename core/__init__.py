"""Transfer-learning lab: dataset sources, training and comparison of image classifiers."""

__version__ = "0.1.0"
