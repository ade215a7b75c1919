//! What an admin API token may do: its roles, and the permissions each role grants.
//!
//! A route asks for one [`Permission`]; a token passes when one of its [`Role`]s grants it.
//! Roles are a closed list that grows by adding a variant (and its line in
//! [`Role::grants`]): a read-only role for a console, say, grants
//! [`Permission::ReadDeadLetters`] alone. The token of `[http.admin]` itself is always
//! [`Role::Admin`], which grants everything, so existing deployments keep their rights.

use std::fmt;

/// A role a token is given in `[http.admin.tokens.NAME].roles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Everything the admin API serves.
    Admin,
    /// Sending messages: `POST /v1/publish` and `GET/DELETE /v1/scheduled/ID`.
    Publisher,
    /// Looking without changing anything: listing, grouping and showing dead letters.
    Viewer,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// List, group and show archived dead letters.
    ReadDeadLetters,
    /// Replay and purge archived dead letters.
    ChangeDeadLetters,
    /// Publish and schedule messages, look at and cancel scheduled ones.
    Publish,
    /// Read the API's own description (`/v1/openapi.json`): any valid token.
    Describe,
    /// See each consumer's and handler's state, breaker and pause (`GET /admin/status`).
    ReadStatus,
    /// Pause and resume consumers and handlers.
    ControlConsumers,
}

impl Role {
    /// Every role, in the order the documentation lists them.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Publisher, Role::Viewer];

    /// The role's name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Publisher => "publisher",
            Role::Viewer => "viewer",
        }
    }

    /// The role named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }

    /// Whether this role may do what `permission` covers.
    pub fn grants(self, permission: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Publisher => matches!(permission, Permission::Publish | Permission::Describe),
            Role::Viewer => matches!(
                permission,
                Permission::ReadDeadLetters | Permission::ReadStatus | Permission::Describe
            ),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_grants_everything_and_publisher_only_publishing() {
        for permission in [
            Permission::ReadDeadLetters,
            Permission::ChangeDeadLetters,
            Permission::Publish,
            Permission::Describe,
            Permission::ReadStatus,
            Permission::ControlConsumers,
        ] {
            assert!(Role::Admin.grants(permission));
        }
        assert!(Role::Viewer.grants(Permission::ReadStatus));
        assert!(!Role::Viewer.grants(Permission::ControlConsumers));
        assert!(!Role::Publisher.grants(Permission::ControlConsumers));
        assert!(Role::Publisher.grants(Permission::Publish));
        assert!(!Role::Publisher.grants(Permission::ReadDeadLetters));
        assert!(!Role::Publisher.grants(Permission::ChangeDeadLetters));
        assert!(Role::Viewer.grants(Permission::ReadDeadLetters));
        assert!(!Role::Viewer.grants(Permission::Publish));
        assert!(!Role::Viewer.grants(Permission::ChangeDeadLetters));
    }

    #[test]
    fn roles_are_named_as_in_the_configuration() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
