"""The FIX dictionary and field enrichment."""

from __future__ import annotations

from marketflow.adapters.fix.dictionary import TAG_ENUMS, TAG_NAMES, enrich, meaning, tag_name


def test_new_order_single_is_enriched_with_names_and_meanings() -> None:
    fields = [(35, "D"), (55, "AAPL"), (54, "1"), (40, "2"), (59, "3")]

    enriched = enrich(fields)

    assert enriched == [
        {"tag": 35, "name": "MsgType", "value": "D", "meaning": "NewOrderSingle"},
        {"tag": 55, "name": "Symbol", "value": "AAPL"},
        {"tag": 54, "name": "Side", "value": "1", "meaning": "Buy"},
        {"tag": 40, "name": "OrdType", "value": "2", "meaning": "Limit"},
        {"tag": 59, "name": "TimeInForce", "value": "3", "meaning": "ImmediateOrCancel"},
    ]


def test_unknown_tag_and_unknown_enum_value_keep_the_raw_value() -> None:
    enriched = enrich([(5001, "x"), (54, "Z")])

    assert enriched == [
        {"tag": 5001, "name": None, "value": "x"},
        {"tag": 54, "name": "Side", "value": "Z"},
    ]


def test_repeating_group_keeps_every_entry_in_order() -> None:
    fields = [(268, "2"), (269, "0"), (270, "1.5"), (269, "1"), (270, "1.6"), (279, "2")]

    meanings = [f.get("meaning") for f in enrich(fields)]

    assert meanings == [None, "Bid", None, "Offer", None, "Delete"]


def test_market_data_and_execution_enums() -> None:
    assert meaning(35, "W") == "MarketDataSnapshotFullRefresh"
    assert meaning(35, "X") == "MarketDataIncrementalRefresh"
    assert meaning(35, "8") == "ExecutionReport"
    assert meaning(39, "2") == "Filled"
    assert meaning(150, "F") == "Trade"
    assert meaning(263, "1") == "SnapshotPlusUpdates"
    assert meaning(265, "1") == "IncrementalRefresh"
    assert meaning(55, "AAPL") is None
    assert tag_name(10) == "CheckSum"
    assert tag_name(999_999) is None


def test_dictionary_covers_a_good_few_dozen_tags_and_every_enum_tag_has_a_name() -> None:
    assert len(TAG_NAMES) >= 60
    assert set(TAG_ENUMS) <= set(TAG_NAMES)
