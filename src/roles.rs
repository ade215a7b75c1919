//! What an admin API token may do: its roles, and the permissions each role grants.
//!
//! A route asks for one [`Permission`]; a token passes when one of its [`Role`]s grants it.
//! Roles are a closed list that grows by adding a variant (and its line in
//! [`Role::grants`]). For dead letters they form a ladder: `viewer` reads, `operator` also
//! replays, `editor` also edits and replays, `admin` also purges (and has every other
//! right). `publisher` only sends messages. The token of `[http.admin]` itself is always
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
    /// A viewer who may also replay dead letters (and cancel replays).
    Operator,
    /// An operator who may also edit a dead letter and replay the edited copy.
    Editor,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// List, group and show archived dead letters.
    ReadDeadLetters,
    /// Replay archived dead letters, cancel a running replay.
    ReplayDeadLetters,
    /// Edit an archived dead letter's body and headers and replay the edited copy.
    EditDeadLetters,
    /// Purge archived dead letters (their bodies and headers are gone for good).
    PurgeDeadLetters,
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
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Publisher,
        Role::Viewer,
        Role::Operator,
        Role::Editor,
    ];

    /// The role's name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Publisher => "publisher",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Editor => "editor",
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
            Role::Operator => {
                Role::Viewer.grants(permission) || permission == Permission::ReplayDeadLetters
            }
            Role::Editor => {
                Role::Operator.grants(permission) || permission == Permission::EditDeadLetters
            }
        }
    }

    /// Whether any of `roles` grants `permission`.
    pub fn any_grants(roles: &[Role], permission: Permission) -> bool {
        roles.iter().any(|r| r.grants(permission))
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
            Permission::ReplayDeadLetters,
            Permission::EditDeadLetters,
            Permission::PurgeDeadLetters,
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
        assert!(!Role::Publisher.grants(Permission::ReplayDeadLetters));
        assert!(Role::Viewer.grants(Permission::ReadDeadLetters));
        assert!(!Role::Viewer.grants(Permission::Publish));
        assert!(!Role::Viewer.grants(Permission::ReplayDeadLetters));
    }

    #[test]
    fn dead_letter_roles_form_a_ladder() {
        use Permission::*;
        let rights = |role: Role| {
            [
                ReadDeadLetters,
                ReplayDeadLetters,
                EditDeadLetters,
                PurgeDeadLetters,
            ]
            .map(|p| role.grants(p))
        };
        assert_eq!(rights(Role::Viewer), [true, false, false, false]);
        assert_eq!(rights(Role::Operator), [true, true, false, false]);
        assert_eq!(rights(Role::Editor), [true, true, true, false]);
        assert_eq!(rights(Role::Admin), [true, true, true, true]);
        assert!(!Role::Editor.grants(ControlConsumers));
        assert!(!Role::Operator.grants(Publish));
    }

    #[test]
    fn roles_are_named_as_in_the_configuration() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
