//! The four worker roles, the one list every crate uses (runner, access, load harness, CLI).

use std::fmt;
use std::str::FromStr;

/// A worker role: the stage of an order it handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The untrusted edge: validates and routes.
    Ingestion,
    /// Checks products and prices, records the order.
    Orders,
    /// Takes stock, substitutes or removes lines, records the packing.
    Warehouse,
    /// Applies carrier status events.
    Delivery,
}

impl Role {
    /// Every role, in the order an order meets them.
    pub const ALL: [Role; 4] = [
        Role::Ingestion,
        Role::Orders,
        Role::Warehouse,
        Role::Delivery,
    ];

    /// Its name in config keys, logs, metrics and attributions.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Ingestion => "ingestion",
            Role::Orders => "orders",
            Role::Warehouse => "warehouse",
            Role::Delivery => "delivery",
        }
    }

    /// Every role's name.
    pub fn names() -> [&'static str; 4] {
        Self::ALL.map(Role::as_str)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}`: use one of ingestion, orders, warehouse, delivery")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_access_table_lists_every_role_once() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("all".parse::<Role>().is_err());
        let declared: Vec<&str> = crate::access::ROLES.iter().map(|r| r.role).collect();
        assert_eq!(declared, Role::names());
    }
}
