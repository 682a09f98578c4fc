"""The launchers: Flower's runtime driven for the user, and the commands that drive it.

The runtime (SuperLink, SuperNodes, `flwr run`), the command lines of simulation.py,
server.py and client.py, and the launchers that keep the apps pinned and the SuperLink's
control APIs off the network. Not shipped to the hospitals in the app bundle: nothing here
runs inside a Flower app.
"""
