//! `spec.policy` of an ExternalCatalog: who may use the catalog, in the style of Gateway API's
//! `allowedRoutes`. Which namespaces may export to it and import from it (`from: All | Selector
//! | None`), which external names they may use (exact, or prefix), whether one name exported
//! from several namespaces is merged, and which imported addresses are taken (CIDR lists).
//!
//! The default, when `policy` (or a direction of it) is left out: every namespace, any name,
//! and one name from several namespaces kept by the oldest export (`sharedNames: Refuse`).
//! Exporting publishes only a namespace's own ready endpoints, and importing only ever puts
//! addresses the API server accepts in an EndpointSlice; what a namespace could take from
//! another — a name another team exports, and its traffic — is refused by default.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use kube::KubeSchema;
use kube::core::{Expression, Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Who may use the catalog. Left out: every namespace, any name; a name exported from two
/// namespaces stays with the oldest export.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CatalogPolicy {
    /// Which namespaces may export to this catalog, under which names, and what happens when
    /// two namespaces export the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportPolicy>,
    /// Which namespaces may import from this catalog, which names, and which addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportPolicy>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportPolicy {
    /// The namespaces whose Services may be exported here. Default: all.
    #[serde(default)]
    pub namespaces: AllowedNamespaces,
    /// The external names they may use; left out or empty: any name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub names: Vec<NameRule>,
    /// One external name exported from several namespaces. `Refuse` (default): the oldest
    /// export (by the creation time of its Service or ExternalRegistration) keeps the name and
    /// the others are refused with `NameConflict`. `Merge`: the catalog holds the union.
    /// Exports from one namespace are always merged.
    #[serde(default)]
    pub shared_names: SharedNames,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImportPolicy {
    /// The namespaces that may import from here. Default: all.
    #[serde(default)]
    pub namespaces: AllowedNamespaces,
    /// The external names they may import; left out or empty: any name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub names: Vec<NameRule>,
    /// Addresses an imported EndpointSlice may hold, beyond the API server's own rules
    /// (never loopback, link-local, unspecified or multicast). An entry outside them is
    /// skipped and counted like an unparsable one; the rest of the import goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<AddressPolicy>,
}

/// Namespaces, chosen as Gateway API's `allowedRoutes.namespaces` chooses them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.from == 'Selector' ? has(self.selector) : !has(self.selector)").message("namespaces.selector goes with from: Selector, and only with it"))]
pub struct AllowedNamespaces {
    /// `All` (default), `Selector` (the namespaces whose labels match `selector`) or `None`.
    #[serde(default)]
    pub from: FromNamespaces,
    /// With `from: Selector`: a label selector on namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<NamespaceSelector>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FromNamespaces {
    #[default]
    All,
    Selector,
    None,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SharedNames {
    #[default]
    Refuse,
    Merge,
}

/// A label selector, as `metav1.LabelSelector`: every term must match.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.operator == 'In' || self.operator == 'NotIn') ? size(self.values) > 0 : size(self.values) == 0").message("values are given with In and NotIn, and only with them"))]
pub struct LabelRequirement {
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabelOperator {
    #[default]
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One rule for external names: `exact` or `prefix`, exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.exact) != has(self.prefix)").message("a name rule is exactly one of exact or prefix"))]
pub struct NameRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub prefix: Option<String>,
}

/// CIDR lists for imported addresses.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AddressPolicy {
    /// When set, only addresses within one of these ranges are imported (for example the
    /// cluster's Pod and Service ranges, or the VMs' network); entries by host name are then
    /// skipped too, as their address cannot be checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = CIDR_PATTERN)))]
    pub allow: Vec<String>,
    /// Addresses within these ranges are never imported (for example the API server's, or
    /// a management network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = CIDR_PATTERN)))]
    pub deny: Vec<String>,
}

/// An IPv4 or IPv6 CIDR, as far as a pattern tells; the controller parses it exactly.
const CIDR_PATTERN: &str =
    r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/[0-9]{1,3})$";

impl AllowedNamespaces {
    /// Whether the namespace with `labels` is allowed. A selector that cannot be read allows
    /// nothing (the schema keeps most such selectors out).
    pub fn allows(&self, labels: &BTreeMap<String, String>) -> bool {
        match self.from {
            FromNamespaces::All => true,
            FromNamespaces::None => false,
            FromNamespaces::Selector => self
                .selector
                .as_ref()
                .is_some_and(|s| s.selector().matches(labels)),
        }
    }

    /// How users read the rule, for a refusal's message.
    pub fn describe(&self) -> String {
        match (self.from, &self.selector) {
            (FromNamespaces::All, _) => "every namespace".into(),
            (FromNamespaces::None, _) => "no namespace".into(),
            (FromNamespaces::Selector, Some(s)) => {
                format!("namespaces matching {:?}", s.selector().to_string())
            }
            (FromNamespaces::Selector, None) => "no namespace (a Selector without selector)".into(),
        }
    }
}

impl NamespaceSelector {
    fn selector(&self) -> Selector {
        let mut exprs: Vec<Expression> = self
            .match_labels
            .iter()
            .map(|(k, v)| Expression::Equal(k.clone(), v.clone()))
            .collect();
        for r in &self.match_expressions {
            let values = r.values.iter().cloned().collect();
            exprs.push(match r.operator {
                LabelOperator::In => Expression::In(r.key.clone(), values),
                LabelOperator::NotIn => Expression::NotIn(r.key.clone(), values),
                LabelOperator::Exists => Expression::Exists(r.key.clone()),
                LabelOperator::DoesNotExist => Expression::DoesNotExist(r.key.clone()),
            });
        }
        exprs.into_iter().collect()
    }
}

/// Whether `rules` let `name` through: no rule, or one that matches.
pub fn name_allowed(rules: &[NameRule], name: &str) -> bool {
    rules.is_empty()
        || rules.iter().any(|r| {
            r.exact.as_deref() == Some(name)
                || r.prefix.as_deref().is_some_and(|p| name.starts_with(p))
        })
}

/// How users read name rules, for a refusal's message.
pub fn describe_names(rules: &[NameRule]) -> String {
    let each: Vec<String> = rules
        .iter()
        .map(|r| match (&r.exact, &r.prefix) {
            (Some(e), _) => format!("{e:?}"),
            (None, Some(p)) => format!("{p:?}*"),
            (None, None) => String::new(),
        })
        .collect();
    each.join(", ")
}

/// A direction's rules, whatever the direction: the namespaces and the names.
pub struct Allowed<'a> {
    pub namespaces: &'a AllowedNamespaces,
    pub names: &'a [NameRule],
}

static DEFAULT_NAMESPACES: AllowedNamespaces = AllowedNamespaces {
    from: FromNamespaces::All,
    selector: None,
};

impl CatalogPolicy {
    /// The export rules (the defaults when left out).
    pub fn export(&self) -> Allowed<'_> {
        match &self.export {
            Some(e) => Allowed {
                namespaces: &e.namespaces,
                names: &e.names,
            },
            None => Allowed {
                namespaces: &DEFAULT_NAMESPACES,
                names: &[],
            },
        }
    }

    /// The import rules (the defaults when left out).
    pub fn import(&self) -> Allowed<'_> {
        match &self.import {
            Some(i) => Allowed {
                namespaces: &i.namespaces,
                names: &i.names,
            },
            None => Allowed {
                namespaces: &DEFAULT_NAMESPACES,
                names: &[],
            },
        }
    }

    /// Whether one name exported from several namespaces is merged.
    pub fn merges_shared_names(&self) -> bool {
        self.export
            .as_ref()
            .is_some_and(|e| e.shared_names == SharedNames::Merge)
    }
}

impl Allowed<'_> {
    /// Why `namespace` (with `labels`) may not use `name` in `catalog`, in words; None when it
    /// may. `what` is "export to" or "import from".
    pub fn refusal(
        &self,
        what: &str,
        catalog: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        name: &str,
    ) -> Option<String> {
        if !self.namespaces.allows(labels) {
            return Some(format!(
                "namespace {namespace} may not {what} ExternalCatalog {catalog}: its policy \
                 allows {}",
                self.namespaces.describe()
            ));
        }
        if !name_allowed(self.names, name) {
            return Some(format!(
                "the name {name:?} is not one namespace {namespace} may {what} ExternalCatalog \
                 {catalog}: its policy allows the names {}",
                describe_names(self.names)
            ));
        }
        None
    }
}

/// The CIDR lists of an import, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AddressRules {
    /// The catalog's import address rules, or why they cannot be read.
    pub fn of(policy: Option<&CatalogPolicy>) -> Result<AddressRules, String> {
        let Some(a) = policy
            .and_then(|p| p.import.as_ref())
            .and_then(|i| i.addresses.as_ref())
        else {
            return Ok(AddressRules::default());
        };
        let parse = |list: &[String], field: &str| {
            list.iter()
                .enumerate()
                .map(|(i, c)| {
                    c.trim().parse::<IpNet>().map_err(|e| {
                        format!(
                            "spec.policy.import.addresses.{field}[{i}] {c:?} is not a CIDR: {e}"
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(AddressRules {
            allow: parse(&a.allow, "allow")?,
            deny: parse(&a.deny, "deny")?,
        })
    }

    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Why the imported `host` (an IP address in canonical form, or a host name) is refused,
    /// None when it is taken.
    pub fn refusal(&self, host: &str) -> Option<String> {
        let Ok(ip) = host.parse::<IpAddr>() else {
            return (!self.allow.is_empty()).then(|| {
                format!(
                    "{host} is a host name, and the catalog's policy imports only addresses \
                     within spec.policy.import.addresses.allow"
                )
            });
        };
        if let Some(net) = self.deny.iter().find(|n| n.contains(&ip)) {
            return Some(format!(
                "{ip} is within {net}, which the catalog's policy refuses \
                 (spec.policy.import.addresses.deny)"
            ));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            let allow: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
            return Some(format!(
                "{ip} is outside the ranges the catalog's policy imports ({})",
                allow.join(", ")
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> CatalogPolicy {
        serde_json::from_value(v).expect("a policy")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespaces_are_chosen_as_gateway_api_chooses_them() {
        let p = policy(
            json!({"export": {"namespaces": {"from": "Selector", "selector": {
                "matchLabels": {"team": "shop"},
                "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["test"]}],
            }}}}),
        );
        let e = p.export();
        assert!(e.namespaces.allows(&labels(&[("team", "shop")])));
        assert!(
            e.namespaces
                .allows(&labels(&[("team", "shop"), ("env", "prod")]))
        );
        assert!(
            !e.namespaces
                .allows(&labels(&[("team", "shop"), ("env", "test")]))
        );
        assert!(!e.namespaces.allows(&labels(&[("team", "pay")])));
        // Import was left out: every namespace.
        assert!(p.import().namespaces.allows(&labels(&[])));
        let none = policy(json!({"import": {"namespaces": {"from": "None"}}}));
        assert!(
            !none
                .import()
                .namespaces
                .allows(&labels(&[("team", "shop")]))
        );
        assert!(!none.merges_shared_names());
    }

    #[test]
    fn names_are_exact_or_prefix_and_a_refusal_says_which() {
        let p = policy(json!({"export": {"names": [{"exact": "api_x"}, {"prefix": "shop-"}]}}));
        let e = p.export();
        let any = labels(&[]);
        assert_eq!(
            e.refusal("export to", "consul", "shop", &any, "api_x"),
            None
        );
        assert_eq!(
            e.refusal("export to", "consul", "shop", &any, "shop-cart"),
            None
        );
        let why = e
            .refusal("export to", "consul", "shop", &any, "api_y")
            .expect("refused");
        assert!(
            why.contains("\"api_y\"") && why.contains("\"shop-\"*"),
            "{why}"
        );
    }

    #[test]
    fn address_rules_deny_first_then_allow_only() {
        let p = policy(json!({"import": {"addresses": {
            "allow": ["198.18.0.0/15", "fd00::/8"], "deny": ["198.18.0.128/25"],
        }}}));
        let r = AddressRules::of(Some(&p)).expect("rules");
        assert_eq!(r.refusal("198.18.0.9"), None);
        assert_eq!(r.refusal("fd00::1"), None);
        assert!(
            r.refusal("198.18.0.200")
                .is_some_and(|w| w.contains("198.18.0.128/25"))
        );
        assert!(r.refusal("10.0.0.1").is_some_and(|w| w.contains("outside")));
        assert!(r.refusal("db.example.com").is_some());
        let deny_only = AddressRules::of(Some(&policy(
            json!({"import": {"addresses": {"deny": ["10.96.0.0/12"]}}}),
        )))
        .expect("rules");
        assert_eq!(deny_only.refusal("db.example.com"), None);
        assert!(deny_only.refusal("10.96.0.1").is_some());
        let bad = AddressRules::of(Some(&policy(
            json!({"import": {"addresses": {"allow": ["300.1.1.1/8"]}}}),
        )));
        assert!(bad.is_err_and(|e| e.contains("allow[0]")));
    }
}
