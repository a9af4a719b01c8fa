"""bench.quic_pump: aioquic's packet path between two in-memory connections."""

from __future__ import annotations

from bench import quic_pump


def test_every_round_trip_echoes_the_payload_in_two_datagrams() -> None:
    """A decode-sized payload fits one datagram each way (with the ACK riding along), and all
    of it comes back; a prefill-sized one over 16 KiB takes the wide STREAM frames."""
    for size in (1024, 8192, 40000):
        result = quic_pump.measure(size, 50)
        assert result["echoed_bytes"] == 50 * size
        assert result["datagrams_per_round_trip"] == 2
        assert result["round_trip_us"] > 0


def test_the_profile_names_aioquic_s_packet_path() -> None:
    result = quic_pump.measure(1024, 20, profile=True)
    assert "receive_datagram" in result["profile"]
