"""Train a retriever for the quantized index it will be served from.

    accelerate launch recipes/train.py recipes/scifact.yaml --output_dir runs/scifact [--data_dir DIR]
        [--index_factory S] [--num_negatives K] [--max_steps N] [--save_strategy steps --save_steps N] [--seed N]
        [--resume_from_checkpoint PATH]

Every option of hf_qret.config.ModelArguments, DataArguments and QRetTrainingArguments (a TrainingArguments
subclass) can be set in the YAML file or on the command line (the command line wins).
"""

import sys

from hf_qret.cli import run_command, train_main

if __name__ == "__main__":
    sys.exit(run_command(train_main, sys.argv[1:]))
