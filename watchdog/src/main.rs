mod loader;
fn main() {
    let mut k = loader::Kernel::load().unwrap();
    k.set_port(8081, watchdog_common::PortConfig { deadline_ns: 1_000_000_000, slot: 1, flags: 3 }).unwrap();
    let mut rb = k.take_events().unwrap();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        while let Some(item) = rb.next() {
            println!("{:?}", watchdog_common::Event::decode(&item));
        }
    }
    println!("{:?} {:?}", k.stats(), k.slot_stats(1));
}
