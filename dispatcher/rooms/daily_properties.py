"""Daily's room and meeting-token properties: each one's JSON type and, where Daily documents
them, its values or longest length. The dispatcher checks a client's properties against these
facts, and the Daily emulator (testkit/fakes/daily.py) refuses with them, so the two cannot drift.

Daily's room and token properties (its schemas `RoomProperties` and `MeetingTokenProperties`,
and the abbreviations of self-signed tokens), taken from:

- daily-co/daily-ruby @ 287e07747c85ad0bfd7fa600b0cd7545dab8cf6a, a client generated from Daily's
  own API description (version 1.1.1): lib/daily-ruby/models/room_properties.rb and
  properties.rb (e.g. the `lang` validator: da, de, en, es, fi, fr, it, jp, ka, nl, no, pt,
  pt-BR, pl, ru, sv, tr, user);
- Daily's docs: https://docs.daily.co/reference/rest-api/rooms/create-room (the `geo`
  regions), https://docs.daily.co/reference/rest-api/meeting-tokens/create-meeting-token
  (`user_id` at most 36 characters) and
  https://docs.daily.co/reference/rest-api/meeting-tokens/self-signing-tokens (the claim
  abbreviations);
- pipecat-ai/pipecat @ 0578390500b2e1c3a093974b4e2923df4cbbbd87,
  src/pipecat/transports/daily/utils.py, for `enable_dialout`, `sip` and `sip_uri` only (they
  are not in Daily's description).

None of these facts is marked unverified there. Where the reference says nothing, nothing is
refused on Daily's behalf: no length for `user_name`, no range for numbers, and no check of a
self-signed token's claim values (Daily reads them only at join time, and what it refuses
there is unverified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What a value of each JSON type is in Python; a bool is never a number here.
_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "object": (dict,),
    "array": (list,),
}
_ARTICLES = {"integer": "an", "object": "an", "array": "an"}


@dataclass(frozen=True)
class Property:
    """A property's JSON type, and the values or the longest length Daily documents for it."""

    type: str
    values: tuple[str, ...] = ()
    max_length: int | None = None

    def allows(self, value: Any) -> bool:
        """Whether `value` is of the type and, if values or a length are documented, within them."""
        if isinstance(value, bool) and self.type != "boolean":
            return False
        if not isinstance(value, _TYPES[self.type]):
            return False
        if self.values and value not in self.values:
            return False
        return self.max_length is None or (isinstance(value, str) and len(value) <= self.max_length)

    @property
    def expected(self) -> str:
        """What a value must be, for error messages: "a boolean", "one of da, de, …"."""
        if self.values:
            return "one of " + ", ".join(self.values)
        kind = f"{_ARTICLES.get(self.type, 'a')} {self.type}"
        if self.max_length is not None:
            return f"{kind} of at most {self.max_length} characters"
        return kind

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the property."""
        schema: dict[str, Any] = {"type": self.type}
        if self.values:
            schema["enum"] = list(self.values)
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        return schema


BOOLEAN = Property("boolean")
STRING = Property("string")
INTEGER = Property("integer")
NUMBER = Property("number")
OBJECT = Property("object")
ARRAY = Property("array")
LANG = Property(
    "string",
    values=(
        "da", "de", "en", "es", "fi", "fr", "it", "jp", "ka", "nl", "no", "pt", "pt-BR", "pl",
        "ru", "sv", "tr", "user",
    ),
)  # fmt: skip
GEO = Property(
    "string",
    values=(
        "af-south-1", "ap-northeast-2", "ap-southeast-1", "ap-southeast-2", "ap-south-1",
        "eu-central-1", "eu-west-2", "sa-east-1", "us-east-1", "us-west-2",
    ),
)  # fmt: skip
TOKEN_RECORDING = Property("string", values=("cloud", "cloud-audio-only", "local", "raw-tracks"))
# "<not set>" is in the generated client's list for rooms, as Daily's description has it.
ROOM_RECORDING = Property("string", values=(*TOKEN_RECORDING.values, "<not set>"))

_ROOM_BOOLEANS = """enable_people_ui enable_pip_ui enable_emoji_reactions enable_hand_raising
    enable_prejoin_ui enable_live_captions_ui enable_network_ui enable_noise_cancellation_ui
    enable_breakout_rooms enable_knocking enable_screenshare enable_video_processing_ui
    enable_chat enable_shared_chat_history start_video_off start_audio_off owner_only_broadcast
    eject_at_room_exp enable_advanced_chat enable_hidden_participants enable_mesh_sfu
    enable_adaptive_simulcast enable_multiparty_adaptive_simulcast enforce_unique_user_ids
    experimental_optimize_large_calls disable_rtmp_geo_fallback enable_terse_logging
    enable_transcription_storage enable_dialout"""
ROOM: dict[str, Property] = {
    **dict.fromkeys(_ROOM_BOOLEANS.split(), BOOLEAN),
    **dict.fromkeys(["nbf", "exp", "max_participants", "eject_after_elapsed"], INTEGER),
    **dict.fromkeys(["meeting_join_hook", "rtmp_geo", "recordings_template"], STRING),
    **dict.fromkeys(["recordings_bucket", "auto_transcription_settings"], OBJECT),
    **dict.fromkeys(["transcription_bucket", "permissions", "sip", "sip_uri"], OBJECT),
    "sfu_switchover": NUMBER,
    "streaming_endpoints": ARRAY,
    "enable_recording": ROOM_RECORDING,
    "lang": LANG,
    "geo": GEO,
}
"""Room properties (`properties` of `POST /rooms`), by name."""

_MEETING_BOOLEANS = """eject_at_token_exp is_owner enable_screenshare start_video_off
    start_audio_off enable_prejoin_ui enable_live_captions_ui enable_recording_ui
    enable_terse_logging start_cloud_recording auto_start_transcription close_tab_on_exit"""
TOKEN: dict[str, Property] = {
    **dict.fromkeys(_MEETING_BOOLEANS.split(), BOOLEAN),
    **dict.fromkeys(["nbf", "exp", "eject_after_elapsed"], INTEGER),
    **dict.fromkeys(["room_name", "user_name", "redirect_on_meeting_exit"], STRING),
    **dict.fromkeys(["start_cloud_recording_opts", "permissions"], OBJECT),
    "user_id": Property("string", max_length=36),
    "enable_recording": TOKEN_RECORDING,
    "lang": LANG,
}
"""Meeting-token properties (`properties` of `POST /meeting-tokens`), by name."""

CLAIMS: dict[str, str] = {
    "nbf": "nbf", "exp": "exp", "domain_id": "d", "room_name": "r", "user_id": "ud",
    "user_name": "u", "is_owner": "o", "knocking": "k", "close_tab_on_exit": "ctoe",
    "redirect_on_meeting_exit": "rome", "intercom_join_alert": "ij",
    "start_cloud_recording": "sr", "start_cloud_recording_opts": "sro",
    "auto_start_transcription": "ast", "enable_recording": "er", "enable_screenshare": "ss",
    "start_video_off": "vo", "start_audio_off": "ao", "meeting_join_hook": "mjh",
    "eject_at_token_exp": "ejt", "eject_after_elapsed": "eje", "lang": "uil",
    "enable_recording_ui": "erui", "permissions": "p",
}  # fmt: skip
"""The claim each token property becomes in a self-signed token."""
