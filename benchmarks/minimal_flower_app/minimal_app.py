"""The smallest Flower app: bench.py's floor for `python simulation.py`.

It imports only Flower and NumPy and keeps Flower's defaults: FedAvg over every SuperNode for
`num-server-rounds` rounds, each training and evaluating, and a ClientApp that returns the
arrays it receives. What simulation.py takes beyond it is SecureHealth-ML's own cost.
"""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

WEIGHTS = 177  # as many as the default model of SecureHealth-ML

client = ClientApp()


@client.train()
def train(message: Message, context: Context) -> Message:
    """Return the arrays received, weighted as one example."""
    reply = {"arrays": message.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}
    return Message(content=RecordDict(reply), reply_to=message)


@client.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Report one example and nothing else."""
    reply = {"metrics": MetricRecord({"num-examples": 1})}
    return Message(content=RecordDict(reply), reply_to=message)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run Flower's FedAvg with its defaults from zero weights."""
    weights = ArrayRecord([np.zeros(WEIGHTS, dtype=np.float32)])
    FedAvg().start(grid, weights, num_rounds=int(context.run_config["num-server-rounds"]))
