"""Phone numbers: E.164, valid for their country, and never longer than E.164 allows (or Callflow stores)."""

from __future__ import annotations

import pytest

from shared.campaigns import spec
from shared.core.phones import e164, normalised_e164

# Valid in the numbering plans phonenumbers knows, yet longer than E.164's 15 digits.
LONGER_THAN_E164 = ["+4966593877840801", "+23470054378040816"]


@pytest.mark.parametrize("number", LONGER_THAN_E164)
def test_a_number_longer_than_e164_allows_is_refused_however_it_is_written(number):
    with pytest.raises(ValueError, match="at most 15 digits"):
        e164(number)
    with pytest.raises(ValueError, match="at most 15 digits"):
        normalised_e164(number)


def test_a_campaign_contact_longer_than_e164_allows_is_rejected_the_others_kept():
    listed = spec.contacts_from_json([{"phoneNumber": "+14155550123"}, *({"phoneNumber": n} for n in LONGER_THAN_E164)])
    assert [contact.phone_number for contact in listed.contacts] == ["+14155550123"]
    assert [(row["row"], row["reason"]) for row in listed.rejected] == [
        (2, "phoneNumber: must have at most 15 digits, as E.164 allows"),
        (3, "phoneNumber: must have at most 15 digits, as E.164 allows"),
    ]


def test_numbers_e164_allows_are_kept():
    assert e164("+14155550123") == "+14155550123"
    assert normalised_e164("+1 (415) 555-0123") == "+14155550123"
