"""Flower's runtime driven for the user (SuperLink, SuperNodes, `flwr run`), the
command lines of server.py and client.py, and the launchers that keep the apps
pinned and the SuperLink's control APIs off the network. Not shipped to the
hospitals in the app bundle: nothing here runs inside a Flower app."""
