"""A counterexample hypothesis found for the exactness model (tests/unit/test_exactness_model.py)
while mutation testing ran it, replayed step by step: PostgreSQL (the fake store) goes down and
up between batches of ticks, nothing crashes, and once everything is up a flush must write the
spilled rows. It did not: a flush requested while the writer was appending to the spill file
had its nudge cleared unread, so the writer slept out its backoff (up to 4 s) first.
"""

from __future__ import annotations

from tests.unit.test_exactness_model import ExactnessMachine


def test_rows_sent_during_store_outages_are_all_stored_once_it_is_back() -> None:
    state = ExactnessMachine()
    state.begin()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.store_switch(down=False)
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.store_switch(down=True)
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("BTCUSDT", 2.0, -131072),
            ("ETHUSDT", 3.5, -22226),
            ("ETHUSDT", 1.0, -6214),
            ("BTCUSDT", 1.0, -879),
            ("BTCUSDT", 1.0, -1510),
            ("BTCUSDT", 1.0, -295),
            ("BTCUSDT", 1.0, -113228),
            ("BTCUSDT", 1.0, -21661),
            ("ETHUSDT", 2.0, -34),
            ("BTCUSDT", 2.0, -179999),
            ("ETHUSDT", 1.0, -5906),
            ("BTCUSDT", 3.5, -90115),
        ]
    )
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("ETHUSDT", 2.0, -17626),
            ("BTCUSDT", 3.5, -423),
            ("ETHUSDT", 2.0, -131071),
            ("BTCUSDT", 2.0, -1697),
            ("ETHUSDT", 3.5, -55),
        ]
    )
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("BTCUSDT", 2.0, -27),
            ("ETHUSDT", 2.0, -669),
            ("BTCUSDT", 1.0, -144304),
            ("BTCUSDT", 2.0, -141109),
            ("ETHUSDT", 3.5, -90748),
            ("ETHUSDT", 1.0, -230),
            ("BTCUSDT", 1.0, -150503),
            ("ETHUSDT", 3.5, -2459),
            ("ETHUSDT", 3.5, -131072),
            ("BTCUSDT", 2.0, -205),
        ]
    )
    state.never_shrinks_never_doubles()
    state.store_switch(down=False)
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("ETHUSDT", 1.0, 0),
            ("ETHUSDT", 1.0, -6849),
            ("BTCUSDT", 2.0, -69337),
            ("ETHUSDT", 1.0, -129397),
            ("BTCUSDT", 2.0, -40603),
            ("ETHUSDT", 3.5, -1084),
            ("BTCUSDT", 2.0, -166491),
            ("ETHUSDT", 3.5, -2981),
            ("ETHUSDT", 2.0, -1442),
            ("ETHUSDT", 3.5, -1182),
            ("ETHUSDT", 2.0, -395),
        ]
    )
    state.never_shrinks_never_doubles()
    state.store_switch(down=True)
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("ETHUSDT", 2.0, -3309),
            ("BTCUSDT", 3.5, -26974),
            ("BTCUSDT", 1.0, -8738),
            ("ETHUSDT", 1.0, -255),
        ]
    )
    state.never_shrinks_never_doubles()
    state.send(ticks=[("ETHUSDT", 1.0, 0), ("BTCUSDT", 3.5, -21)])
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.store_switch(down=True)
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("ETHUSDT", 3.5, -1733),
            ("BTCUSDT", 1.0, -2022),
            ("ETHUSDT", 1.0, -2029),
            ("BTCUSDT", 3.5, -8722),
            ("BTCUSDT", 2.0, -336),
        ]
    )
    state.never_shrinks_never_doubles()
    state.send(
        ticks=[
            ("ETHUSDT", 2.0, -4001),
            ("BTCUSDT", 1.0, -74291),
            ("BTCUSDT", 3.5, 0),
            ("ETHUSDT", 1.0, -25922),
        ]
    )
    state.never_shrinks_never_doubles()
    state.flush()
    state.never_shrinks_never_doubles()
    state.teardown()
