"""Building blocks shared by methods (classifiers, training loops)."""
