"""Python values to Value and back, without a server."""

import unittest
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from paxos_commit._pb import paxoscommit_pb2 as pb
from paxos_commit.values import INT32_MAX, INT64_MAX, INT64_MIN, Infinity, Json, from_value, to_value


def kind(v: object) -> str:
    return to_value(v).WhichOneof("kind")


class ToValue(unittest.TestCase):
    def test_each_python_type_has_its_kind(self) -> None:
        cases = [
            (None, "null"),
            (True, "bool"),
            (7, "int"),
            (1.5, "float"),
            ("x", "text"),
            (b"\x00", "bytes"),
            (bytearray(b"a"), "bytes"),
            (Decimal("0.1"), "decimal"),
            (datetime(2024, 1, 1, tzinfo=timezone.utc), "timestamptz"),
            (datetime(2024, 1, 1), "timestamp"),
            (date(2024, 1, 1), "date"),
            (uuid.UUID(int=1), "uuid"),
            ({"a": 1}, "json"),
            ([1, 2], "json"),
            (Json("s"), "json"),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(kind(value), expected)

    def test_bool_is_not_an_int_and_big_ints_are_exact_decimals(self) -> None:
        self.assertEqual(to_value(False).bool, False)
        self.assertEqual(to_value(INT64_MAX).int, INT64_MAX)
        self.assertEqual(to_value(INT64_MIN).int, INT64_MIN)
        self.assertEqual(to_value(2**64).decimal, str(2**64))

    def test_decimals_are_sent_exactly(self) -> None:
        self.assertEqual(to_value(Decimal("0.1")).decimal, "0.1")
        self.assertEqual(to_value(Decimal("-12.50")).decimal, "-12.50")
        self.assertEqual(to_value(Decimal("1E-3")).decimal, "0.001")
        self.assertEqual(to_value(Decimal("NaN")).decimal, "NaN")
        self.assertEqual(to_value(Decimal("-Infinity")).decimal, "-Infinity")
        with self.assertRaises(TypeError):
            to_value(Decimal("sNaN"))

    def test_instants_are_microseconds_since_the_epoch(self) -> None:
        plus_two = timezone(timedelta(hours=2))
        aware = datetime(1970, 1, 1, 2, 0, 0, 1, tzinfo=plus_two)
        self.assertEqual(to_value(aware).timestamptz, 1)
        before = datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
        self.assertEqual(to_value(before).timestamptz, -1)
        self.assertEqual(to_value(datetime(1970, 1, 2)).timestamp, 86_400_000_000)
        far = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
        self.assertEqual(to_value(far).timestamptz, 253_402_300_799_999_999)
        self.assertEqual(to_value(date(1970, 1, 2)).date, 1)
        self.assertEqual(to_value(date(1969, 12, 31)).date, -1)

    def test_infinities(self) -> None:
        self.assertEqual(to_value(Infinity("timestamptz")).timestamptz, INT64_MAX)
        self.assertEqual(to_value(-Infinity("timestamp")).timestamp, INT64_MIN)
        self.assertEqual(to_value(Infinity("date")).date, INT32_MAX)
        self.assertEqual(-(-Infinity("date")), Infinity("date"))

    def test_json(self) -> None:
        self.assertEqual(to_value({"a": [1, None]}).json, '{"a": [1, null]}')
        self.assertEqual(to_value(Json("s")).json, '"s"')
        self.assertEqual(to_value(Json(3)).json, "3")

    def test_unknown_types_are_refused(self) -> None:
        for value in [object(), (1, 2), {1, 2}, timedelta(1)]:
            with self.subTest(value=value), self.assertRaises(TypeError):
                to_value(value)


class FromValue(unittest.TestCase):
    def test_round_trips(self) -> None:
        values = [
            None,
            True,
            -5,
            2.25,
            "text",
            b"\x00\xff",
            Decimal("0.30"),
            datetime(2024, 2, 29, 12, 30, 0, 123456, tzinfo=timezone.utc),
            datetime(1900, 1, 1, 0, 0, 0, 1),
            date(1, 1, 1),
            uuid.uuid4(),
            {"k": [1, "two", None, True]},
            Infinity("timestamptz"),
            -Infinity("timestamp"),
            Infinity("date"),
            -Infinity("date"),
        ]
        for value in values:
            with self.subTest(value=value):
                self.assertEqual(from_value(to_value(value)), value)

    def test_timestamptz_comes_back_in_utc(self) -> None:
        local = datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5)))
        back = from_value(to_value(local))
        self.assertEqual(back, local)
        self.assertEqual(back.utcoffset(), timedelta(0))

    def test_decimal_keeps_postgresql_scale_and_specials(self) -> None:
        self.assertEqual(str(from_value(pb.Value(decimal="0.30"))), "0.30")
        self.assertTrue(from_value(pb.Value(decimal="NaN")).is_nan())
        self.assertEqual(from_value(pb.Value(decimal="-Infinity")), Decimal("-Infinity"))

    def test_uuid_and_json_results(self) -> None:
        u = "6f1c2a4e-8b2d-4c1e-9a3f-0123456789ab"
        self.assertEqual(from_value(pb.Value(uuid=u)), uuid.UUID(u))
        self.assertEqual(from_value(pb.Value(json='"s"')), "s")

    def test_an_unset_value_is_null(self) -> None:
        self.assertIsNone(from_value(pb.Value()))

    def test_instants_beyond_python_say_what_to_do(self) -> None:
        with self.assertRaisesRegex(ValueError, "cast the column"):
            from_value(pb.Value(timestamptz=INT64_MAX - 1))
        with self.assertRaisesRegex(ValueError, "cast the column"):
            from_value(pb.Value(date=INT32_MAX - 1))


if __name__ == "__main__":
    unittest.main()
