import pytest

from shared.observability.scrubbing import FILTERED, mask_phone, scrub, scrub_text

SECRET = "s3cret-webhook-token-value"


def test_phone_numbers_keep_only_the_last_four_digits():
    assert mask_phone("+14155550123") == "+*******0123"
    assert scrub("calling +14155550123 now") == "calling +*******0123 now"
    assert scrub("/api?to=%2B14155550123") == "/api?to=+*******0123"
    assert scrub("/api?to=%2b14155550123") == "/api?to=+*******0123"


def test_secrets_tokens_and_credentials_are_removed_from_strings():
    text = (
        f"POST /webhooks/bolna?token={SECRET}&x=1 Authorization: Bearer cf_abcdefghijklmnopqrstuvwxyz "
        "amqp://guest:guest@rabbit:5672/ and raw cf_0123456789abcdefghij"
    )
    cleaned = scrub(text, secrets=(SECRET,))
    assert SECRET not in cleaned
    assert "cf_abcdefghijklmnopqrstuvwxyz" not in cleaned and "cf_0123456789abcdefghij" not in cleaned
    assert "guest:guest" not in cleaned
    assert f"token={FILTERED}" in cleaned


def test_sensitive_keys_are_dropped_everywhere_in_an_event():
    event = {
        "tags": {"user_id": "u1", "api_token": "cf_x"},
        "contexts": {"webhook": {"transcript": "user: hello", "status": "completed"}},
        "request": {"headers": [["Authorization", "Bearer abc"], ["Accept", "*/*"]], "query_string": f"token={SECRET}"},
        "extra": {"user_data": {"name": "Ada"}, "count": 3},
        "breadcrumbs": {"values": [{"data": {"metadata": {"a": 1}}, "message": "to +14155550123"}]},
    }
    cleaned = scrub(event, secrets=(SECRET,))
    assert cleaned["tags"] == {"user_id": "u1", "api_token": FILTERED}
    assert cleaned["contexts"]["webhook"] == {"transcript": FILTERED, "status": "completed"}
    assert cleaned["request"]["headers"][0] == ["Authorization", f"Bearer {FILTERED}"]
    assert SECRET not in str(cleaned)
    assert cleaned["extra"] == {"user_data": FILTERED, "count": 3}
    assert cleaned["breadcrumbs"]["values"][0] == {"data": {"metadata": FILTERED}, "message": "to +*******0123"}


def test_ids_and_timestamps_are_left_alone():
    value = {"call_id": "0b1d0d3e-1c2a-4b7f-9a34-1234567890ab", "at": "2026-11-29T01:45:48+00:00", "n": 42}
    assert scrub(value) == value


@pytest.mark.parametrize(
    "text",
    [
        "GET /x?TOKEN=abc",
        "ApiKey=abc&Api_Key=def",
        "Access_Token=abc",
        "SECRET=abc",
        "PassWord=hunter2",
        "BEARER abcdef",
        "Basic dXNlcjpwYXNz",
        "cf_abcdefghijklmnopqrst",
        "POSTGRESQL://u:p@h/db",
        "to %2b14155550123",
        "to +14155550123",
        "paſſword=hunter2",
        "baſic dXNlcjpwYXNz",
        "apıkey=x",
    ],
)
def test_the_quick_search_lets_through_every_string_a_pattern_would_change(text):
    assert scrub_text(text) != text
