from dataclasses import dataclass, field
from typing import Literal

import pytest

from shared.config import BrokerConfig, ConfigError, build, load_toml


@dataclass(frozen=True)
class Source:
    uri: str
    cls: str


@dataclass(frozen=True)
class Sample:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    runtime: Literal["auto", "onnxruntime"] = "auto"
    threads: int = 2
    sources: list[Source] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)


def test_broker_urls():
    assert BrokerConfig.from_url("mqtt://u:p%40ss@host:1884") == BrokerConfig("host", 1884, "u", "p@ss")
    assert BrokerConfig.from_url("mqtts://h").port == 8883
    assert BrokerConfig.from_url("localhost").host == "localhost"
    assert "p@ss" not in BrokerConfig.from_url("mqtt://u:p%40ss@host").url
    for bad in ("http://h", "mqtt://h:notaport", "mqtt://"):
        with pytest.raises(ConfigError):
            BrokerConfig.from_url(bad)


def test_build_nested_config(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text('runtime = "onnxruntime"\n[broker]\nport = 1884\n[[sources]]\nuri = "x"\ncls = "brick"\n'
                 '[thresholds]\nbrick = 2\n')
    cfg = build(Sample, load_toml(p))
    assert cfg.broker.port == 1884 and cfg.sources == [Source("x", "brick")]
    assert cfg.thresholds == {"brick": 2.0}


@pytest.mark.parametrize("doc, reason", [
    ({"threads": "2"}, "threads: expected an integer"),
    ({"runtime": "gpu"}, "runtime: 'gpu' is not one of"),
    ({"broker": {"hots": "x"}}, "unknown key.*broker.hots"),
    ({"sources": [{"uri": "x"}]}, r"missing required key sources\[0\].cls"),
    ({"threads": True}, "expected an integer"),
])
def test_bad_values_name_the_key(doc, reason):
    with pytest.raises(ConfigError, match=reason):
        build(Sample, doc)


def test_toml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("threads = = 2\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_toml(p)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
