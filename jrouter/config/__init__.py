"""Configuration: router.xml, router-users.xml and the files' shared grammar, read in one place.

Owns turning the operator's files into frozen values, and every problem in
them, named by file, line and element (``FILE:LINE: element.path: message``),
all reported together.  Must not know what the settings are used for: it
opens no socket, log file or pidfile and logs nothing.

Modules:
  xmlfile     hardened XML parsing, element text as jabberd2's expat reads it
  grammar     the one grammar of values (numbers, switches, names, addresses)
              and ``Problems``, the one way a problem is written
  router_xml  router.xml -> ``Config`` (jabberd2's keys, ``<components>``)
  sections    our sections: ``<status>``, ``<clustering>``, ``<cluster>``
  users       router-users.xml -> name -> secret
  filter_xml  router-filter.xml -> ``routing.filter.FilterRules``
"""

from .router_xml import (CONFIG_DIR, COMPONENT_NAMESPACES, DEFAULT_CIPHERS, DEFAULT_CONFIG_FILE,
                         DEFAULT_STANZA_SIZE, SYSLOG_FACILITIES, Alias, Config,
                         ConfigError, LogSettings, load_config)
from .sections import (ClusterSettings, EtcdSettings, PeerSettings, StatusSettings, parse_cluster,
                       parse_clustering, parse_status)
from .users import UsersResult, load_users
from .xmlfile import XMLProblem, element_text, parse_xml

__all__ = ["CONFIG_DIR", "COMPONENT_NAMESPACES", "DEFAULT_CIPHERS", "DEFAULT_CONFIG_FILE",
           "DEFAULT_STANZA_SIZE", "SYSLOG_FACILITIES", "Alias", "ClusterSettings", "Config",
           "ConfigError", "EtcdSettings", "LogSettings", "PeerSettings", "StatusSettings",
           "UsersResult", "XMLProblem", "element_text", "load_config", "load_users",
           "parse_cluster", "parse_clustering", "parse_status", "parse_xml"]
