// The browser half of benchmarks/mlflow_screenshots.py, which serves a store with `mlflow ui` and passes a
// JSON spec: headless Chromium opens the runs table and the compare-runs page and photographs them.
//
//     python benchmarks/mlflow_screenshots.py --store mlflow.db

const { chromium } = require('playwright-core');

const spec = JSON.parse(process.argv[2]);

async function settle(page, shown) {
  await shown.first().waitFor({ timeout: 90000 });
  await page.waitForTimeout(2000); // the grid and the plots size themselves after the data arrive
}

// The compare page's parallel-coordinates plot starts on the first params in name order
// (objective.beta, objective.intervention, ...): keep the wanted ones, in order.
async function choose(page, label, wanted) {
  const select = page.locator(`xpath=//div[normalize-space(text())="${label}"]/following-sibling::div[1]`);
  const chips = select.locator('.du-bois-light-select-selection-item');
  for (;;) {
    const shown = await chips.locator('.du-bois-light-select-selection-item-content').allTextContents();
    const extra = shown.findIndex((name) => !wanted.includes(name));
    if (extra < 0) break;
    await chips.nth(extra).locator('.du-bois-light-select-selection-item-remove').click();
  }
  const shown = await chips.locator('.du-bois-light-select-selection-item-content').allTextContents();
  for (const name of wanted.filter((n) => !shown.includes(n))) {
    const box = await select.boundingBox(); // its middle may be a chip's remove button
    await page.mouse.click(box.x + box.width - 40, box.y + box.height / 2);
    await page.keyboard.type(name);
    const option = page.locator(`.du-bois-light-select-item-option[title="${name}"]`).first();
    try {
      await option.click({ timeout: 5000 });
    } catch {
      console.warn(`${label} ${name}: not among these runs' keys`);
    }
    await page.keyboard.press('Escape');
  }
}

(async () => {
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  try {
    const context = await browser.newContext({ viewport: { width: spec.width, height: spec.height } });
    // on a first visit the UI opens its assistant panel over a third of the page
    await context.addInitScript(() => {
      localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
      localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
    });
    const page = await context.newPage();
    await page.goto(spec.runs_url);
    await settle(page, page.locator('.ag-row').getByText(spec.first_run, { exact: true })); // a row, not the breadcrumb
    await page.screenshot({ path: spec.runs_png });

    await page.setViewportSize({ width: spec.width, height: spec.compare_height });
    await page.goto(spec.compare_url);
    await settle(page, page.getByText('Parameters:', { exact: true }));
    await choose(page, 'Parameters:', spec.params);
    await choose(page, 'Metrics:', spec.metrics);
    // params: only those that differ; metrics: all, so the evaluations (first in name order) always show
    await page.getByRole('switch').first().click();
    await page.evaluate(() => document.querySelectorAll('*').forEach((e) => { e.scrollTop = 0; }));
    await page.mouse.move(0, 0); // no hover tooltip on the plot
    await page.waitForTimeout(1500);
    await page.screenshot({ path: spec.compare_png });
  } finally {
    await browser.close();
  }
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
