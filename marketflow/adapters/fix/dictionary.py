"""FIX 4.2/4.4 data dictionary (the common tags) and enrichment of parsed fields.

Enrichment turns ``(35, "D")`` into ``{"tag": 35, "name": "MsgType", "value": "D",
"meaning": "NewOrderSingle"}`` so the audit trail reads without a FIX spec at hand. It is a list,
not a dict keyed by tag: repeating groups (268 NoMDEntries, 146 NoRelatedSym) repeat tags, and
order matters. Unknown tags keep their number and value with ``name`` None; no ``meaning`` key
is written unless the tag has an enumeration and the value is one of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from marketflow.domain.capture import EnrichedField

TAG_NAMES: Mapping[int, str] = {
    1: "Account", 6: "AvgPx", 7: "BeginSeqNo", 8: "BeginString", 9: "BodyLength",
    10: "CheckSum", 11: "ClOrdID", 14: "CumQty", 15: "Currency", 16: "EndSeqNo",
    17: "ExecID", 18: "ExecInst", 20: "ExecTransType", 21: "HandlInst",
    22: "SecurityIDSource", 30: "LastMkt", 31: "LastPx", 32: "LastQty", 34: "MsgSeqNum",
    35: "MsgType", 36: "NewSeqNo", 37: "OrderID", 38: "OrderQty", 39: "OrdStatus",
    40: "OrdType", 41: "OrigClOrdID", 43: "PossDupFlag", 44: "Price", 45: "RefSeqNum",
    47: "Rule80A", 48: "SecurityID", 49: "SenderCompID", 50: "SenderSubID",
    52: "SendingTime", 54: "Side", 55: "Symbol", 56: "TargetCompID", 57: "TargetSubID",
    58: "Text", 59: "TimeInForce", 60: "TransactTime", 63: "SettlType", 64: "SettlDate",
    65: "SymbolSfx", 75: "TradeDate", 90: "SecureDataLen", 91: "SecureData",
    95: "RawDataLength", 96: "RawData", 97: "PossResend", 98: "EncryptMethod",
    99: "StopPx", 100: "ExDestination", 102: "CxlRejReason", 103: "OrdRejReason",
    108: "HeartBtInt", 109: "ClientID", 110: "MinQty", 111: "MaxFloor", 112: "TestReqID",
    115: "OnBehalfOfCompID", 122: "OrigSendingTime", 123: "GapFillFlag",
    126: "ExpireTime", 128: "DeliverToCompID", 141: "ResetSeqNumFlag",
    146: "NoRelatedSym", 150: "ExecType", 151: "LeavesQty", 167: "SecurityType",
    207: "SecurityExchange", 212: "XmlDataLen", 213: "XmlData", 262: "MDReqID",
    263: "SubscriptionRequestType", 264: "MarketDepth", 265: "MDUpdateType",
    266: "AggregatedBook", 267: "NoMDEntryTypes", 268: "NoMDEntries", 269: "MDEntryType",
    270: "MDEntryPx", 271: "MDEntrySize", 272: "MDEntryDate", 273: "MDEntryTime",
    276: "QuoteCondition", 277: "TradeCondition", 278: "MDEntryID", 279: "MDUpdateAction",
    280: "MDEntryRefID", 281: "MDReqRejReason", 290: "MDEntryPositionNo",
    336: "TradingSessionID", 346: "NumberOfOrders", 369: "LastMsgSeqNumProcessed",
    371: "RefTagID", 372: "RefMsgType", 373: "SessionRejectReason",
    434: "CxlRejResponseTo", 553: "Username", 554: "Password",
    789: "NextExpectedMsgSeqNum", 1128: "ApplVerID", 1137: "DefaultApplVerID",
}  # fmt: skip

_YES_NO = {"Y": "Yes", "N": "No"}

TAG_ENUMS: Mapping[int, Mapping[str, str]] = {
    35: {
        "0": "Heartbeat", "1": "TestRequest", "2": "ResendRequest", "3": "Reject",
        "4": "SequenceReset", "5": "Logout", "6": "IOI", "7": "Advertisement",
        "8": "ExecutionReport", "9": "OrderCancelReject", "A": "Logon", "B": "News",
        "C": "Email", "D": "NewOrderSingle", "E": "NewOrderList", "F": "OrderCancelRequest",
        "G": "OrderCancelReplaceRequest", "H": "OrderStatusRequest", "Q": "DontKnowTrade",
        "R": "QuoteRequest", "S": "Quote", "V": "MarketDataRequest",
        "W": "MarketDataSnapshotFullRefresh", "X": "MarketDataIncrementalRefresh",
        "Y": "MarketDataRequestReject", "b": "MassQuoteAcknowledgement",
        "c": "SecurityDefinitionRequest", "d": "SecurityDefinition",
        "e": "SecurityStatusRequest", "f": "SecurityStatus",
        "g": "TradingSessionStatusRequest", "h": "TradingSessionStatus", "i": "MassQuote",
        "j": "BusinessMessageReject", "n": "XMLnonFIX", "q": "OrderMassCancelRequest",
        "r": "OrderMassCancelReport", "x": "SecurityListRequest", "y": "SecurityList",
        "AE": "TradeCaptureReport", "AF": "OrderMassStatusRequest",
        "AR": "TradeCaptureReportAck", "BE": "UserRequest", "BF": "UserResponse",
    },
    54: {
        "1": "Buy", "2": "Sell", "3": "BuyMinus", "4": "SellPlus", "5": "SellShort",
        "6": "SellShortExempt", "7": "Undisclosed", "8": "Cross", "9": "CrossShort",
    },
    40: {
        "1": "Market", "2": "Limit", "3": "Stop", "4": "StopLimit", "5": "MarketOnClose",
        "6": "WithOrWithout", "7": "LimitOrBetter", "8": "LimitWithOrWithout", "9": "OnBasis",
        "D": "PreviouslyQuoted", "E": "PreviouslyIndicated", "G": "ForexSwap",
        "J": "MarketIfTouched", "K": "MarketWithLeftOverAsLimit", "P": "Pegged",
    },
    59: {
        "0": "Day", "1": "GoodTillCancel", "2": "AtTheOpening", "3": "ImmediateOrCancel",
        "4": "FillOrKill", "5": "GoodTillCrossing", "6": "GoodTillDate", "7": "AtTheClose",
    },
    39: {
        "0": "New", "1": "PartiallyFilled", "2": "Filled", "3": "DoneForDay", "4": "Canceled",
        "5": "Replaced", "6": "PendingCancel", "7": "Stopped", "8": "Rejected",
        "9": "Suspended", "A": "PendingNew", "B": "Calculated", "C": "Expired",
        "D": "AcceptedForBidding", "E": "PendingReplace",
    },
    150: {
        "0": "New", "1": "PartialFill", "2": "Fill", "3": "DoneForDay", "4": "Canceled",
        "5": "Replaced", "6": "PendingCancel", "7": "Stopped", "8": "Rejected",
        "9": "Suspended", "A": "PendingNew", "B": "Calculated", "C": "Expired",
        "D": "Restated", "E": "PendingReplace", "F": "Trade", "G": "TradeCorrect",
        "H": "TradeCancel", "I": "OrderStatus",
    },
    20: {"0": "New", "1": "Cancel", "2": "Correct", "3": "Status"},
    21: {
        "1": "AutomatedExecutionNoIntervention", "2": "AutomatedExecutionInterventionOK",
        "3": "ManualOrder",
    },
    22: {"1": "CUSIP", "2": "SEDOL", "4": "ISIN", "5": "RIC", "8": "ExchangeSymbol"},
    43: _YES_NO, 97: _YES_NO, 123: _YES_NO, 141: _YES_NO, 266: _YES_NO,
    63: {"0": "Regular", "1": "Cash", "2": "NextDay", "3": "TPlus2", "4": "TPlus3"},
    98: {
        "0": "None", "1": "PKCS", "2": "DES", "3": "PKCS/DES", "4": "PGP/DES",
        "5": "PGP/DES-MD5", "6": "PEM/DES-MD5",
    },
    102: {
        "0": "TooLateToCancel", "1": "UnknownOrder", "2": "BrokerOption",
        "3": "OrderAlreadyInPendingStatus", "6": "DuplicateClOrdID", "99": "Other",
    },
    103: {
        "0": "BrokerOption", "1": "UnknownSymbol", "2": "ExchangeClosed",
        "3": "OrderExceedsLimit", "4": "TooLateToEnter", "5": "UnknownOrder",
        "6": "DuplicateOrder", "8": "StaleOrder", "11": "UnsupportedOrderCharacteristic",
        "13": "IncorrectQuantity", "99": "Other",
    },
    167: {
        "CS": "CommonStock", "FUT": "Future", "OPT": "Option", "FOR": "ForeignExchange",
        "SPOT": "Spot", "PERP": "Perpetual",
    },
    263: {
        "0": "Snapshot", "1": "SnapshotPlusUpdates",
        "2": "DisablePreviousSnapshotPlusUpdateRequest",
    },
    265: {"0": "FullRefresh", "1": "IncrementalRefresh"},
    269: {
        "0": "Bid", "1": "Offer", "2": "Trade", "3": "IndexValue", "4": "OpeningPrice",
        "5": "ClosingPrice", "6": "SettlementPrice", "7": "TradingSessionHighPrice",
        "8": "TradingSessionLowPrice", "9": "TradingSessionVWAPPrice", "A": "Imbalance",
        "B": "TradeVolume", "C": "OpenInterest",
    },
    279: {
        "0": "New", "1": "Change", "2": "Delete", "3": "DeleteThru", "4": "DeleteFrom",
        "5": "Overlay",
    },
    281: {
        "0": "UnknownSymbol", "1": "DuplicateMDReqID", "2": "InsufficientBandwidth",
        "3": "InsufficientPermissions", "4": "UnsupportedSubscriptionRequestType",
        "5": "UnsupportedMarketDepth", "6": "UnsupportedMDUpdateType",
        "7": "UnsupportedAggregatedBook", "8": "UnsupportedMDEntryType",
    },
    373: {
        "0": "InvalidTagNumber", "1": "RequiredTagMissing",
        "2": "TagNotDefinedForThisMessageType", "3": "UndefinedTag",
        "4": "TagSpecifiedWithoutAValue", "5": "ValueIsIncorrect",
        "6": "IncorrectDataFormatForValue", "7": "DecryptionProblem", "8": "SignatureProblem",
        "9": "CompIDProblem", "10": "SendingTimeAccuracyProblem", "11": "InvalidMsgType",
        "99": "Other",
    },
    434: {"1": "OrderCancelRequest", "2": "OrderCancelReplaceRequest"},
    1128: {"7": "FIX50", "8": "FIX50SP1", "9": "FIX50SP2"},
}  # fmt: skip


def tag_name(tag: int) -> str | None:
    """The dictionary name of ``tag`` (None when it is not in the dictionary)."""
    return TAG_NAMES.get(tag)


def meaning(tag: int, value: str) -> str | None:
    """The meaning of ``value`` for an enumerated ``tag``, e.g. (54, "1") -> "Buy"."""
    enum = TAG_ENUMS.get(tag)
    return None if enum is None else enum.get(value)


def enrich(fields: Sequence[tuple[int, str]]) -> list[EnrichedField]:
    """Per field, in wire order: tag number, name, raw value and meaning where one applies."""
    names = TAG_NAMES
    enums = TAG_ENUMS
    out: list[EnrichedField] = []
    append = out.append
    # Hot path (every captured message): plain lookups, no per-field function calls.
    for tag, value in fields:
        item: EnrichedField = {"tag": tag, "name": names.get(tag), "value": value}
        enum = enums.get(tag)
        if enum is not None:
            m = enum.get(value)
            if m is not None:
                item["meaning"] = m
        append(item)
    return out


class FixDictionary:
    """This dictionary as the capture use case's ``FieldDictionary`` port (domain/capture.py)."""

    def meaning(self, tag: int, value: str) -> str | None:
        return meaning(tag, value)

    def enrich(self, fields: Sequence[tuple[int, str]]) -> list[EnrichedField]:
        return enrich(fields)
