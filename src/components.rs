//! Component assembly: one supervised component per configured consumer, outbox relay,
//! postgres inbox (its sweeper) and dead-letter processor, built from the shared [`Resources`]. Used by the runtime at start
//! and by reload for the components whose inputs changed.

use std::sync::Arc;

use anyhow::Context as _;

use crate::config;
use crate::consumers::ConsumerSpec;
use crate::resources::{
    Resources, consumer_component_name, dead_letter_component_name, inbox_component_name,
    outbox_component_name,
};
use crate::supervisor::{Component, NamedComponent};

/// Builds the components for every configured consumer, outbox and dead-letter processor.
pub fn components_for(resources: &Resources) -> anyhow::Result<Vec<NamedComponent>> {
    components_named(resources, |_| true)
}

/// Builds the configured components whose component name `wanted` accepts, in the order
/// consumers, outboxes, dead-letter processors; the others are not built at all.
pub fn components_named(
    resources: &Resources,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<NamedComponent>> {
    let config = &resources.config;
    crate::consumers::attach_budgets(resources);
    let mut components: Vec<NamedComponent> = Vec::new();
    for (name, consumer) in &config.consumers {
        let component_name = consumer_component_name(name);
        if !wanted(&component_name) {
            continue;
        }
        let component = build_consumer(name, consumer, resources)
            .with_context(|| format!("consumer `{name}`"))?;
        components.push((component_name, component));
    }
    for name in config.outboxes.keys() {
        let component_name = outbox_component_name(name);
        if !wanted(&component_name) {
            continue;
        }
        let component = crate::outbox::component(name, resources)
            .with_context(|| format!("outbox `{name}`"))?;
        components.push((component_name, Arc::new(component)));
    }
    for (name, inbox) in &config.inboxes {
        let component_name = inbox_component_name(name);
        let config::InboxStore::Postgres {
            database,
            table,
            migrate,
        } = &inbox.store
        else {
            // Redis records expire by their TTL: nothing to sweep.
            continue;
        };
        if !wanted(&component_name) {
            continue;
        }
        let sweeper = crate::inbox::sweep::Sweeper::new(
            name,
            resources.database(database)?,
            table,
            inbox.window,
            *migrate,
        )
        .with_context(|| format!("inbox `{name}`"))?;
        components.push((component_name, Arc::new(sweeper)));
    }
    for (name, dl) in &config.dead_letters {
        let component_name = dead_letter_component_name(name);
        if !wanted(&component_name) {
            continue;
        }
        let component = crate::dead_letter::processor::build(name, dl, resources)
            .with_context(|| format!("dead-letter processor `{name}`"))?;
        components.push((component_name, component));
    }
    Ok(components)
}

fn build_consumer(
    name: &str,
    consumer: &config::ConsumerConfig,
    resources: &Resources,
) -> anyhow::Result<Arc<dyn Component>> {
    crate::consumers::build(ConsumerSpec {
        name,
        component: &consumer_component_name(name),
        consumer,
        config: &resources.config,
        handler: resources.handler(&consumer.handler)?,
        gate: resources.gate(name, &consumer.handler),
        bounded_handler: true,
        inbox: crate::consumers::inbox_for(
            name,
            consumer,
            &resources.config,
            &resources.databases,
        )?,
    })
}
