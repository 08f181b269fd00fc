"""Normalised records, manifests, masks and one reader per data source."""
