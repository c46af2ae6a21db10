"""webhook-receiver: takes Bolna's status webhooks."""
