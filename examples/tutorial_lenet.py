"""PaddlePaddle's tutorial "save, load and resume training" (LeNet on MNIST with paddle.Model),
made fault tolerant with paddlerun's checkpoint callback. Lines marked ``# paddlerun`` are the
changes; the command-line options and the digest at the end are there to compare runs.

    python examples/tutorial_lenet.py            # kill it, run it again: it resumes (./checkpoints)
    paddlerun run --script examples/tutorial_lenet.py --nproc-per-node 2 -- --epochs 2

Run again once it has finished (a requeued job), it trains nothing and saves the same model.

It prints ``digest <sha256>`` of the trained parameters, the value ``paddlerun ckpt digest``
gives for the final snapshot: an interrupted and resumed run prints the same one as a run
that never stopped.
"""
import argparse
import os

import paddle
from paddle.static import InputSpec
from paddle.vision.models import LeNet

from paddlerun.trainer.data import mnist  # paddlerun: local MNIST (paddle's MNIST downloads it)
from paddlerun.trainer.rundir.digest import params_digest
from paddlerun.trainer.hapi import Checkpoint  # paddlerun

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
parser.add_argument("--checkpoint-dir",
                    default=os.environ.get("PADDLERUN_CHECKPOINT_DIR", "checkpoints"),
                    help="default: $PADDLERUN_CHECKPOINT_DIR (set by paddlerun run --script), "
                         "else ./checkpoints")
parser.add_argument("--every-steps", type=int, default=100, help="a snapshot every this many steps")
parser.add_argument("--verbose", type=int, default=1)
args = parser.parse_args()

paddle.seed(2024)  # paddlerun: the same initial weights in every run, to compare runs bit for bit
train_dataset = mnist("train")  # paddlerun: was MNIST(mode='train', transform=Normalize(...))
# The input's shape, for the inference model: a run that resumes after the last step
# trains nothing, so hapi could not learn it from a batch.
image = InputSpec([None, 1, 28, 28], "float32", "image")
label = InputSpec([None, 1], "int64", "label")
model = paddle.Model(LeNet(), image, label)
optim = paddle.optimizer.Adam(learning_rate=0.001, parameters=model.parameters())
model.prepare(optim, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
ckpt = Checkpoint(args.checkpoint_dir, every_steps=args.every_steps, max_steps=args.max_steps)  # paddlerun
model.fit(ckpt.loader(train_dataset, batch_size=64),  # paddlerun: was train_dataset, batch_size=64
          epochs=args.epochs, verbose=args.verbose, callbacks=[ckpt])  # paddlerun: callbacks
model.save('checkpoint/test')  # save for training
model.save('inference_model', False)  # save for inference

print("digest", params_digest({k: v.numpy() for k, v in model.network.state_dict().items()}))
