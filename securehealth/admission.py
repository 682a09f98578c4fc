"""Who counts in a deployed run: the server admits each connected node as a hospital, or not.

`Admission.refresh` asks every new node for its hospital number, its agreement with the
settings and, where hospital keys are enrolled, proof of its key (authorisation.py).
A node joins only as a hospital it has proven to be, once per number; the others are
refused, named, and never sent a training message (docs/explanation/threat-model.md).
"""

import secrets
from logging import WARNING
from typing import Any

from flwr.app import Message, MessageType
from flwr.common import GetPropertiesIns, log

from securehealth.authorisation import identity_proven
from securehealth.flower import getpropertiesins_to_recorddict, recorddict_to_getpropertiesres
from securehealth.privacy.report import REASON_LIMIT
from securehealth.text import quoted, untrusted

NOT_ADMITTED = "not-admitted"  # the notice to a refused node: why it is not in the run
ADMISSION_TIMEOUT = 120  # seconds for a node to answer (it starts a ClientApp process)


class Admission:
    """The run's members: connected nodes admitted as hospitals 0..num_clients-1.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The run's grid, through which nodes are asked and told.
    cfg : Settings
        The run's settings (num_clients and secure_aggregation are read).
    run_id : int
        The run's id, part of what an enrolled hospital signs.
    enrolled_keys : dict, optional
        Hospital number to its enrolled public key; without it, no proof is asked for.
    """

    def __init__(self, grid, cfg, run_id, enrolled_keys=None):
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.enrolled_keys = enrolled_keys or {}  # hospital number -> its public key
        self.members = {}  # node id -> hospital number
        self.disagreeing = {}  # node id -> (hospital number, why it cannot take part)
        self.refused = {}  # node id -> why it is not a hospital of this run
        # node id -> why not yet: its number is held by another node, which may be a
        # crashed process of the same hospital that Flower has not noticed yet
        self.waiting = {}

    def refresh(self) -> None:
        """Ask every connected node not yet judged to be admitted, and judge it.

        A node that has gone is forgotten (a restarted hospital is asked again); a node
        that does not answer in time is asked at the next refresh; a refused node is
        told why.
        """
        connected = set(self.grid.get_node_ids())
        for judged in (self.members, self.waiting):
            for node in [n for n in judged if n not in connected]:
                del judged[node]  # gone; a restarted hospital is asked again
        new = connected - set(self.members) - set(self.disagreeing) - set(self.refused)
        if not new:
            return
        challenges = {node: secrets.token_hex(16) for node in new}
        questions = [
            Message(
                getpropertiesins_to_recorddict(
                    GetPropertiesIns(
                        {
                            "challenge": challenges[node],
                            "secure_aggregation": self.cfg.secure_aggregation,
                        }
                    )
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in sorted(new)
        ]
        for reply in self.grid.send_and_receive(questions, timeout=ADMISSION_TIMEOUT):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed = untrusted(reply.error.reason, REASON_LIMIT)
                self._refuse(node, f"its admission check failed: {failed}")
                continue
            try:
                answer = dict(recorddict_to_getpropertiesres(reply.content).properties)
                self._judge(node, answer, challenges[node])
            except Exception as error:  # a trust boundary: a node may answer anything
                self._refuse(node, f"its admission answer is malformed ({type(error).__name__})")
        # Nodes that did not answer in time are asked again at the next refresh.
        self._tell_refused([node for node in sorted(new) if node in self.refused])

    def _tell_refused(self, nodes: list[int]) -> None:
        """Tell each refused node why, so that its client.py stops; no answer is awaited.

        Without the notice, it would wait for a run it is not part of (node.hospital_mod).
        """
        notices = [
            Message(
                getpropertiesins_to_recorddict(
                    GetPropertiesIns({NOT_ADMITTED: self.refused[node][:REASON_LIMIT]})
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in nodes
        ]
        if notices:
            self.grid.push_messages(notices)

    def _judge(self, node, answer, challenge):
        """Admit `node`, refuse it, or hold it back while another node has its number."""
        hospital = answer.get("hospital")
        if not isinstance(hospital, int) or not 0 <= hospital < self.cfg.num_clients:
            return self._refuse(
                node, f"it claims hospital {quoted(hospital)}, not one of this run's"
            )
        if self.enrolled_keys and not identity_proven(
            self.enrolled_keys[hospital],
            str(answer.get("proof", "")),
            challenge,
            self.run_id,
            node,
            hospital,
        ):
            return self._refuse(
                node,
                f"it claims to be hospital {hospital} but did not prove it with hospital "
                f"{hospital}'s enrolled key",
            )
        holder = next((n for n, h in self.members.items() if h == hospital), None)
        if holder is not None:  # asked again at every refresh, until the holder is gone
            reason = f"it claims hospital {hospital}, which is in the run already as node {holder}"
            if self.waiting.get(node) != reason:
                log(WARNING, "Not admitting node %d yet: %s", node, reason)
            self.waiting[node] = reason
            return
        self.waiting.pop(node, None)
        if answer.get("problem"):
            reason = untrusted(answer["problem"], REASON_LIMIT)
            self.disagreeing[node] = (hospital, reason)
            log(WARNING, "Hospital %d (node %d) cannot take part: %s", hospital, node, reason)
        else:
            self.members[node] = hospital

    def _refuse(self, node, reason):
        """Refuse `node` for this run, and log why."""
        self.refused[node] = reason
        log(WARNING, "Refused node %d: %s", node, reason)

    def complete(self) -> bool:
        """Return whether every hospital 0..num_clients-1 has been admitted."""
        return sorted(self.members.values()) == list(range(self.cfg.num_clients))

    def refusals(self) -> list[dict[str, Any]]:
        """Return every node that was not admitted, and why, as metrics.json records it.

        Returns
        -------
        list of dict
            One entry per node: "node" and "reason", and "hospital" for a hospital
            that answered it cannot take part (the reason is its own).
        """
        refused = sorted({**self.refused, **self.waiting}.items())
        return [{"node": str(n), "reason": r} for n, r in refused] + [
            {"node": str(n), "hospital": h, "reason": r}
            for n, (h, r) in sorted(self.disagreeing.items())
        ]

    def hospitals(self) -> list[int]:
        """Return the nodes known to be this run's hospitals, admitted or not.

        They are told when the run ends.
        """
        return sorted({*self.members, *self.disagreeing})
