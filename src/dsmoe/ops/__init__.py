"""Custom ops, one op per file with its plans beside it: routed_swiglu, the dropless experts' computation."""
