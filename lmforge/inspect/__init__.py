"""Look inside a model: the logit lens (what each layer's residual stream would predict) and
attention maps (who attends to whom, per head). Importing this package loads nothing heavy."""
