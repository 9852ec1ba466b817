"""Tests of the tiled contrastive losses (issue 5): tiled equals dense on every backend, in cached steps too."""
