"""cancel-broker service: consumes cancel events and signals the workers holding matched runs."""

from broker.embedded import EmbeddedRedis
from broker.metrics import BrokerMetrics
from broker.service import Broker

__all__ = ["Broker", "BrokerMetrics", "EmbeddedRedis"]
