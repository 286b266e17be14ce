"""The text study's three arms (text/rope.py, text/hybrid.py, text/nope.py): configs/tiny.py with only
`model.no_rope_layer_interval` changed, nothing else. Train on the offline corpus at length 128, then
`nopejax eval-length --lengths 128,256,512,1024` (`python -m experiments.length_generalization.run
--tasks text` runs it). The synthetic tasks have their own recipes:
experiments/length_generalization/{copy,reverse,passkey}/.
"""
