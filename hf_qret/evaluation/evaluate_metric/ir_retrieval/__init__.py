# The metric script ir_retrieval.py is loaded by `evaluate.load` from this folder; this file only makes the folder
# part of the installed package.
