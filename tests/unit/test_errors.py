from shared.core.errors import ERROR_TABLE, CallflowError, Capture, ErrorType, Severity


def test_every_error_type_has_exactly_one_row():
    assert set(ERROR_TABLE) == set(ErrorType)


def test_rows_are_consistent():
    for error_type, spec in ERROR_TABLE.items():
        assert spec.level in {"fatal", "error", "warning", "info"}, error_type
        assert spec.http_status is None or 400 <= spec.http_status < 600, error_type
        if spec.severity is Severity.CRITICAL:
            assert spec.capture is Capture.EVENT, error_type


def test_issue_taxonomy_severities():
    expected = {
        ErrorType.CONCURRENCY_LIMIT: Severity.WARNING,
        ErrorType.AGENT_NOT_FOUND: Severity.CRITICAL,
        ErrorType.UNAUTHORIZED_AGENT_ACCESS: Severity.HIGH,
        ErrorType.AGENT_NOT_CONFIGURED: Severity.HIGH,
        ErrorType.BOLNA_API_FAILURE: Severity.CRITICAL,
        ErrorType.WEBHOOK_AUTH_FAILED: Severity.HIGH,
        ErrorType.CREDIT_DEDUCTION_FAILED: Severity.CRITICAL,
        ErrorType.EMPTY_WEBHOOK_PAYLOAD: Severity.WARNING,
    }
    for error_type, severity in expected.items():
        assert ERROR_TABLE[error_type].severity is severity, error_type


def test_error_keeps_only_known_context():
    error = CallflowError(ErrorType.AGENT_NOT_FOUND, "gone", user_id="u", call_id=None)
    assert error.tags == {"user_id": "u"}
    assert error.spec.http_status == 404
