"""Studies: a typed config in, a result out (to_dict, save, plot); the audit and the experiments call them.

`cache` is the one content-keyed step cache; `result` the result protocol; `probe_sweep` and
`suppression` the studies the audit and experiments/probe_layers.py, experiments/suppress.py share.
"""
